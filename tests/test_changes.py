"""ChangeFeed: applied values followed off the frame loop, only what changed handed on."""

from __future__ import annotations

import threading
from typing import Any

from engine.control.changes import ChangeFeed
from engine.control.operator import Operator
from engine.control.state import ControlState
from tests.fakes import wait_until


def test_listeners_get_only_the_values_that_changed() -> None:
    control = ControlState({"seed": 1, "guidance_scale": 1.2})
    feed = ChangeFeed(control)
    seen: list[dict[str, Any]] = []
    feed.subscribe(lambda changed: seen.append(dict(changed)))
    feed.start()
    try:
        control.mark_applied({"seed": 1, "guidance_scale": 1.7})  # seed is as it was
        assert wait_until(lambda: seen == [{"guidance_scale": 1.7}], 5), seen
        control.mark_applied({"t_index_list": [20, 40]})  # a value not there before
        assert wait_until(lambda: seen[-1:] == [{"t_index_list": [20, 40]}], 5), seen
        control.mark_applied({"seed": 1})  # nothing changed: nobody is told
        control.mark_applied({"seed": 2})
        assert wait_until(lambda: seen[-1:] == [{"seed": 2}], 5), seen
        assert {"seed": 1} not in seen
    finally:
        feed.close()
        feed.close()
    assert not any(t.name == "latentstage-changes" and t.is_alive() for t in threading.enumerate())


def test_wait_applied_returns_at_once_after_a_change_and_after_the_timeout_without() -> None:
    control = ControlState()
    seen = control.applied_version
    assert control.wait_applied(seen, 0.05) == seen  # nothing: back after the timeout
    control.mark_applied({"seed": 3})
    assert control.wait_applied(seen, 5.0) == seen + 1


def test_the_operator_tells_its_subscribers_of_changes_and_stops_after_unsubscribe() -> None:
    operator = Operator()
    calls: list[int] = []
    unsubscribe = operator.subscribe(lambda: calls.append(1))
    operator.changed({"seed": 4})
    operator.sample({"fps": 30.0})
    assert len(calls) == 2
    unsubscribe()
    operator.changed({"seed": 5})
    assert len(calls) == 2
    assert [s["fps"] for s in operator.history()["samples"]] == [30.0]
    assert operator.history(since=1e9)["samples"] == []


def test_a_failing_listener_neither_ends_the_feed_nor_starves_the_others(caplog) -> None:
    """A listener that raised ended the feed's thread: pushes stopped for good, silently."""
    control = ControlState({"seed": 1})
    feed = ChangeFeed(control)
    seen: list[dict[str, Any]] = []
    calls = {"broken": 0}

    def broken(changed: Any) -> None:
        calls["broken"] += 1
        raise KeyError("a page socket gone wrong")

    feed.subscribe(broken)
    feed.subscribe(lambda changed: seen.append(dict(changed)))
    feed.start()
    try:
        with caplog.at_level("ERROR", logger="engine.control.changes"):
            for seed in range(2, 6):
                control.mark_applied({"seed": seed})
                assert wait_until(lambda seed=seed: seen[-1:] == [{"seed": seed}], 5), seen
        assert calls["broken"] == 4, "told every change, though it fails"
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "KeyError" in errors[0].getMessage(), "one line, rate-limited"
    finally:
        feed.close()
