"""Safe mode's seams in the worker, in-process: Health reports in-flight changes through its
callback, SafeMode keeps its list without module state and talks only through what it is given
(the end-to-end safe mode, with real crashes and lifts, is in test_restarts.py)."""

from __future__ import annotations

from worker.health import Health
from worker.quarantine import SafeMode, parse_arg


def test_health_reports_every_in_flight_change_in_start_order():
    h = Health()
    seen: list[list[str]] = []
    h.started("a")  # no callback yet: nothing to tell, nothing breaks
    h.on_in_flight = seen.append
    h.started("b")
    h.ended("a")
    h.ended("a")  # not in flight any more: no change, no report
    h.ended("b")
    assert seen == [["a", "b"], ["b"], []]
    assert h.node() is None


def safe(nodes: dict[str, str]):
    events, frames = [], []
    sm = SafeMode(nodes, broadcast=events.append, to_supervisor=frames.append, find_node=lambda nid: None,
                  has_clients=lambda: True)
    return sm, events, frames


def test_two_safe_modes_share_nothing_and_the_argument_is_copied():
    arg = parse_arg('{"n1": "3 crashes"}')
    a, _, _ = safe(arg)
    b, _, _ = safe({})
    a.lift("n1")
    assert arg == {"n1": "3 crashes"} and a.get_quarantine() == {} and b.get_quarantine() == {}


def test_lift_tells_clients_and_the_supervisor_unless_the_supervisor_asked():
    sm, events, frames = safe({"n1": "r1", "n2": "r2"})
    assert sm.lift("n1") == {"n2": "r2"}
    assert frames == [{"type": "lift_quarantine", "node": "n1"}]
    assert any("node_quarantine_lifted" in str(e) and "n1" in str(e) for e in events)
    sm.apply({"type": "quarantine", "nodes": {"n3": "r3"}})  # the supervisor's list now: n2 lifted, n3 added
    assert sm.get_quarantine() == {"n3": "r3"}
    assert frames == [{"type": "lift_quarantine", "node": "n1"}]  # not echoed back to the supervisor
    assert any("node_quarantined" in str(e) and "n3" in str(e) for e in events)
    sm.apply({"type": "quarantine", "nodes": "junk"})
    assert sm.get_quarantine() == {"n3": "r3"}


def test_lifting_a_node_that_is_not_quarantined_is_a_clear_error():
    sm, _, frames = safe({})
    try:
        sm.lift("nope")
    except ValueError as e:
        assert "not quarantined" in str(e)
    else:
        raise AssertionError("no error")
    assert frames == []


def test_the_verbs_are_registered_through_commands_register():
    class Registry:  # the one method SafeMode uses of Commands
        def __init__(self):
            self.verbs = {}

        def register(self, name, fn):
            self.verbs[name] = fn

    sm, _, _ = safe({"n1": "r"})
    r = Registry()
    sm.register(r)
    assert set(r.verbs) == {"lift_quarantine", "get_quarantine"} and r.verbs["get_quarantine"]() == {"n1": "r"}
