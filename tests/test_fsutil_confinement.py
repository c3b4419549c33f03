"""fsutil's confinement in-process, on real files: no symlink below the base, at any component."""

import os

import pytest

from worker.fsutil import (ConfinedWriter, PathEscape, open_confined, safe_relative, walk_confined,
                           write_confined)


@pytest.fixture
def layout(tmp_path):
    base, out = tmp_path / "data", tmp_path / "outside"
    (base / "files" / "real").mkdir(parents=True)
    out.mkdir()
    (out / "secret").write_text("s")
    (base / "files" / "real" / "ok.txt").write_text("ok")
    os.symlink(out, base / "files" / "dirlink")
    os.symlink(out / "secret", base / "files" / "real" / "filelink")
    return base, out


@pytest.mark.parametrize("rel", ["dirlink/x", "dirlink/a/b/x", "real/filelink/x"])
def test_writes_through_a_symlinked_folder_are_refused(layout, rel):
    base, out = layout
    with pytest.raises(PathEscape, match="symbolic link|not a folder"):
        write_confined(base, "files", rel, b"x")
    assert sorted(p.name for p in out.iterdir()) == ["secret"]


def test_a_symlinked_files_folder_is_refused(tmp_path):
    base, out = tmp_path / "data", tmp_path / "outside"
    base.mkdir()
    out.mkdir()
    os.symlink(out, base / "files")
    with pytest.raises(PathEscape, match="files is a symbolic link"):
        write_confined(base, "files", "a.txt", b"x")
    assert list(out.iterdir()) == []


def test_the_last_component_replaces_a_symlink_instead_of_following_it(layout):
    base, out = layout
    write_confined(base, "files", "real/filelink", b"mine")
    assert (out / "secret").read_text() == "s"
    assert not (base / "files" / "real" / "filelink").is_symlink()


def test_writes_are_all_or_nothing_and_leave_no_folders_behind(layout):
    base, _ = layout
    with pytest.raises(PathEscape):
        with ConfinedWriter(base, "files") as w:
            w.write("new/deep/a.txt", b"1")
            w.write("dirlink/b.txt", b"2")
            w.commit()
    assert not (base / "files" / "new").exists()
    assert sorted(p.name for p in (base / "files").iterdir()) == ["dirlink", "real"]


def test_reads_and_walks_skip_symlinks(layout):
    base, _ = layout
    with open_confined(base, "files/real/ok.txt") as f:
        assert f.read() == b"ok"
    for rel in ("files/real/filelink", "files/dirlink/secret"):
        with pytest.raises(PathEscape):
            open_confined(base, rel)
    found = []
    for rel, fd in walk_confined(base, "files"):
        os.close(fd)
        found.append(str(rel))
    assert found == ["real/ok.txt"]


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../b", "", ".", "a\\b", "a\x00b"])
def test_safe_relative_refuses_what_escapes(name):
    with pytest.raises(ValueError):
        safe_relative(name)
