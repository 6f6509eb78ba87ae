"""Every live change takes one path: OSC datagram → ControlState → one plan → (build) → one commit."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from engine.accel.backends import TorchBackend
from engine.control.dispatch import OscDispatcher
from engine.runtime.changes import open_pipeline
from engine.stream.modes import CfgType
from tests.fakes import pipeline_settings, playing, wait_until
from tests.test_backends import SlowBackend
from tests.test_lora_scales import load, lora  # noqa: F401  (the module-scoped LoRA fixture)


def settings():
    """n = 2, cfg self: UNet batch 2 (full makes it 4, a third slot 3)."""
    return pipeline_settings(t_index_list=[32, 45], cfg_type=CfgType.SELF, guidance_scale=1.2)


def datagram(address: str, *values: object) -> bytes:
    builder = OscMessageBuilder(address)
    for value in values:
        builder.add_arg(value)
    return builder.build().dgram


def counted(pipe) -> Counter:
    """Count ``plan`` and ``commit`` calls on ``pipe`` (the real methods still run)."""
    calls: Counter = Counter()
    for name in ("plan", "commit"):
        method = getattr(pipe, name)

        def wrapper(*args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(pipe, name, wrapper)
    return calls


@contextlib.contextmanager
def live(pipe, backend):
    """An engine playing ``pipe`` on ``backend``, fed by an OSC dispatcher (no sockets)."""
    with playing(pipe, 30.0, backend=backend) as (engine, sink, _thread):
        yield engine, OscDispatcher(engine.control, engine.control.applied), sink


@pytest.mark.parametrize(
    ("address", "values", "done"),
    [
        ("/resolution", (96, 64), lambda pipe: (pipe.width, pipe.height) == (96, 64)),
        ("/t_index_list", (10, 25, 40), lambda pipe: pipe.batch.n == 3),
        ("/cfg_type", ("full",), lambda pipe: pipe.unet_batch_size == 4),
    ],
    ids=["resolution", "t_index_list-new-n", "cfg_type"],
)
def test_a_shape_change_is_planned_once_built_off_the_loop_and_committed_once(bundle, address, values, done):
    backend = SlowBackend(bundle, delay=0.4)  # a build the change must wait for
    pipe = open_pipeline(bundle, settings(), backend)
    calls = counted(pipe)
    with live(pipe, backend) as (engine, dispatcher, sink):
        assert dispatcher.handle_datagram(datagram(address, *values), ("127.0.0.1", 5000)) == []
        assert wait_until(lambda: engine.stats.snapshot()["building"] is not None)
        assert calls == Counter(), "nothing is planned while the engines are built"
        frames_while_building = len(sink.frames)
        assert wait_until(lambda: done(pipe), timeout=10)
        assert wait_until(lambda: engine.stats.snapshot()["building"] is None)
        assert len(sink.frames) > frames_while_building, "the old shapes kept playing"
    assert calls == Counter(plan=1, commit=1)
    assert engine.control.applied()[address.strip("/")] == pipe.state[address.strip("/")]


def test_lora_scales_are_planned_once_and_committed_once(lora):  # noqa: F811
    models = load(lora, 1.0)
    backend = TorchBackend(models)
    pipe = open_pipeline(models, settings(), backend)
    before = {k: v.clone() for k, v in models.unet.state_dict().items() if "lora" not in k}
    calls = counted(pipe)
    with live(pipe, backend) as (_engine, dispatcher, _sink):
        dispatcher.handle_datagram(datagram("/lora_scales", 0.25), ("127.0.0.1", 5000))
        assert wait_until(lambda: pipe.state["lora_scales"] == [0.25])
    assert calls == Counter(plan=1, commit=1)
    assert models.lora_scales == [0.25]
    after = models.unet.state_dict()
    assert any(not after[k].equal(v) for k, v in before.items()), "the UNet weights moved"


def test_a_change_that_joins_a_waiting_build_is_still_planned_once(bundle):
    """/t_index_list (n=3) then /resolution while the first waits: one plan, one commit, both."""
    backend = SlowBackend(bundle, delay=0.4)
    pipe = open_pipeline(bundle, settings(), backend)
    calls = counted(pipe)
    with live(pipe, backend) as (engine, dispatcher, _sink):
        dispatcher.handle_datagram(datagram("/t_index_list", 10, 25, 40), ("127.0.0.1", 5000))
        assert wait_until(lambda: engine.stats.snapshot()["building"] is not None)
        dispatcher.handle_datagram(datagram("/resolution", 96, 64), ("127.0.0.1", 5000))
        assert wait_until(lambda: pipe.batch.n == 3 and pipe.width == 96, timeout=10)
    assert calls == Counter(plan=1, commit=1)
