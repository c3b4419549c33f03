"""examples/systemd, examples/supervisord and examples/k8s as they stand: the unit files and the
supervisord section are exactly what the generators print (only the placeholders below differ),
and the Kubernetes probes hit endpoints that a real worker answers with 200.

Regenerate the systemd/supervisord examples after changing units.py:
    python tests/test_examples_deploy.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import REPO, free_port  # noqa: E402
from helpers import WorkerProc, write_config  # noqa: E402

EXAMPLES = REPO / "examples"
# placeholders of the examples: where fn-supervise is installed, the FuncNodes folder, the demo worker
EXE = "/usr/local/bin/fn-supervise"
BASE = "/var/lib/funcnodes"
DEMO_UUID = "0d3e5f7a9b1c4d2e8f6a4b2c0e1d3f5a"

FILES = {
    "systemd/fn-supervise@.service": ("systemd-unit", "--template"),
    "systemd/fn-supervise-demo.service": ("systemd-unit", f"worker_{DEMO_UUID}"),
    "systemd/fn-supervise-demo.socket": ("systemd-unit", f"worker_{DEMO_UUID}", "--socket"),
    "supervisord/fn-supervise.conf": ("supervisord-conf", f"worker_{DEMO_UUID}"),
    "systemd/fn-supervise-host.service": ("systemd-unit", "--host", "--metrics-port", "9380"),
    "supervisord/fn-supervise-host.conf": ("supervisord-conf", "--host", "--metrics-port", "9380"),
}


def generate(args: tuple[str, ...], tmp: Path) -> str:
    """What the generator prints for the demo worker (default timers, own venv), placeholders in."""
    base = tmp / "fncfg"
    if not (base / "workers" / f"worker_{DEMO_UUID}.json").exists():
        write_config(base, DEMO_UUID, name="demo", port=9382, package_dependencies={})
    r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(base), *args, "--exec", EXE],
                       capture_output=True, text=True, cwd=str(REPO), timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.replace(str(base.resolve()), BASE)


@pytest.mark.parametrize("name", sorted(FILES))
def test_unit_examples_are_what_the_generators_print(name, tmp_path):
    text = (EXAMPLES / name).read_text()
    assert text == generate(FILES[name], tmp_path), (
        f"examples/{name} drifted from the generator; regenerate: python tests/test_examples_deploy.py")
    if "--socket" not in FILES[name]:  # a .socket unit names a port, not a program
        assert EXE in text and BASE in text


def _yaml_docs(path: Path) -> list[dict]:
    yaml = pytest.importorskip("yaml")  # PyYAML: a dependency of funcnodes-core (exposedfunctionality)
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _deployment() -> tuple[dict, dict, list[dict]]:
    docs = _yaml_docs(EXAMPLES / "k8s" / "deployment.yaml")
    dep = next(d for d in docs if d.get("kind") == "Deployment")
    return dep, dep["spec"]["template"]["spec"], docs


def _resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def test_k8s_deployment_shape():
    from supervisor import units
    from supervisor.config import SupervisorConfig

    dep, pod, docs = _deployment()
    assert dep["apiVersion"] == "apps/v1" and dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # never two supervisors on one worker folder
    assert pod["terminationGracePeriodSeconds"] > SupervisorConfig().stop_deadline()
    assert pod["terminationGracePeriodSeconds"] >= units.stop_timeout(SupervisorConfig())
    c = next(c for c in pod["containers"] if c["name"] == "fn-supervise")
    env = {e["name"]: e for e in c["env"]}
    uuid = env["WORKER_UUID"]["value"]
    assert c["command"][:2] == ["fn-supervise", "run"] and c["command"][2] == "worker_$(WORKER_UUID)"
    # FUNCNODES_CONFIG_DIR on a volume
    cfg_dir = env["FUNCNODES_CONFIG_DIR"]["value"]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == cfg_dir)
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "persistentVolumeClaim" in vol
    assert any(d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == vol["persistentVolumeClaim"]
               ["claimName"] for d in docs)
    # the token comes from a Secret
    ref = env["FN_SUPERVISE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert any(d.get("kind") == "Secret" and d["metadata"]["name"] == ref["name"] for d in docs)
    # the init container creates the worker on 0.0.0.0 at the port the probes use, once
    init = pod["initContainers"][0]
    script = " ".join(init["command"])
    port = _resolve_port(c, c["livenessProbe"]["httpGet"]["port"])
    assert "--host 0.0.0.0" in script and f"--port {port}" in script and "test -f" in script
    assert init["env"] == [e for e in c["env"] if e["name"] in ("WORKER_UUID", "FUNCNODES_CONFIG_DIR")]
    assert re.fullmatch(r"[0-9a-f]{32}", uuid)


def test_k8s_probes_answer_200_on_a_real_worker_with_a_token(config_dir):
    dep, pod, _ = _deployment()
    c = next(c for c in pod["containers"] if c["name"] == "fn-supervise")
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c}
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
    uuid = next(e["value"] for e in c["env"] if e["name"] == "WORKER_UUID")
    port = free_port()
    write_config(config_dir, uuid, host="0.0.0.0", port=port)
    w = WorkerProc(config_dir, uuid, port, args=("--host", "0.0.0.0"), env={"FN_SUPERVISE_TOKEN": "s3cret"})
    try:
        w.wait_ready(60)
        for kind, get in probes.items():
            assert get.get("scheme", "HTTP") == "HTTP"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{get['path']}", timeout=5) as r:
                assert r.status == 200, kind
                assert json.loads(r.read())["uuid"] == uuid
        # the token is on: anything else needs it (probes carry none)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        assert e.value.code == 401
    finally:
        w.stop()


def test_k8s_host_mode_shape_and_its_probes_on_a_real_host(config_dir, tmp_path):
    from supervisor import units
    from supervisor.config import SupervisorConfig
    from test_host import start_host

    docs = _yaml_docs(EXAMPLES / "k8s" / "host.yaml")
    dep = next(d for d in docs if d.get("kind") == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["terminationGracePeriodSeconds"] >= units.host_stop_timeout([SupervisorConfig()]) - 15
    c = next(c for c in pod["containers"] if c["name"] == "fn-supervise")
    assert c["command"][:2] == ["fn-supervise", "host"]
    mport = int(c["command"][c["command"].index("--metrics-port") + 1])
    assert _resolve_port(c, c["livenessProbe"]["httpGet"]["port"]) == mport
    assert c["readinessProbe"]["exec"]["command"] == ["fn-supervise", "list"]
    init = pod["initContainers"][0]
    uuids = next(e["value"] for e in init["env"] if e["name"] == "WORKER_UUIDS").split()
    script = " ".join(init["command"])
    assert "--autostart" in script and "--host 0.0.0.0" in script
    worker_ports = sorted(p["containerPort"] for p in c["ports"] if p["name"] != "metrics")
    assert worker_ports == [9382 + i for i in range(len(uuids))]
    svc = next(d for d in docs if d.get("kind") == "Service")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == worker_ports
    ref = next(e for e in c["env"] if e["name"] == "FN_SUPERVISE_TOKEN")["valueFrom"]["secretKeyRef"]
    assert any(d.get("kind") == "Secret" and d["metadata"]["name"] == ref["name"] for d in docs)
    # the probes, on a real host (loopback here): /metrics answers 200, `fn-supervise list` exits 0
    port = free_port()
    host = start_host(config_dir, tmp_path, "--metrics-port", str(port), "--no-sidecars")
    try:
        from conftest import poll_until

        def metrics_ok():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{c['livenessProbe']['httpGet']['path']}",
                                            timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        poll_until(metrics_ok, 30, what="host /metrics")
        r = subprocess.run([sys.executable, "-m", "supervisor", "--dir", str(config_dir), "list"],
                           capture_output=True, text=True, cwd=str(REPO), timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        host.terminate()
        assert host.wait(30) == 0


if __name__ == "__main__":  # rewrite the generated examples
    with tempfile.TemporaryDirectory() as d:
        os.environ["FUNCNODES_CONFIG_DIR"] = d
        for name, args in FILES.items():
            target = EXAMPLES / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(generate(args, Path(d)))
            print(f"wrote {target}")
