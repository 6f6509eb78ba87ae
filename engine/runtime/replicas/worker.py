"""A replica process: the whole pipeline on one device, making the frames the engine sends it."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.runtime.replicas.wire import REPLICA_RANK, Kind, Link, Message, link_error

logger = logging.getLogger(__name__)

_FINGERPRINT_SAMPLES = 64
_SUM_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica process is started with (plain data: it crosses a process spawn).

    ``config``: the validated config as JSON data; ``device``: where its pipeline runs; ``threads``:
    ``torch.set_num_threads`` (0: torch's default); ``store_file``: its link's rendezvous.
    """

    number: int
    config: dict[str, Any]
    device: str
    threads: int
    store_file: str
    join_timeout_s: float
    log_level: str = "INFO"


def weights_fingerprint(models: Any) -> dict[str, Any]:
    """What identifies the weights, cheap even for SDXL: a digest of every tensor's name and shape
    (``layout``) and, per tensor, the sum of a strided sample of its values (``sums``)."""
    layout = hashlib.sha256()
    sums: list[float] = []
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(models, part, None)
        if module is None or not hasattr(module, "state_dict"):
            continue
        for name, tensor in module.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
            layout.update(f"{part}.{name}{tuple(tensor.shape)}".encode())
            sums.append(float(flat[::step][:_FINGERPRINT_SAMPLES].to("cpu", torch.float64).sum()))
    return {"layout": layout.hexdigest()[:16], "sums": sums}


def same_weights(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether two fingerprints are of the same weights: the same tensors, and sample sums equal up to
    float rounding (a LoRA fused with another thread count may differ in the last bits; another file or
    another seed differs by far more)."""
    if ours.get("layout") != theirs.get("layout") or len(ours["sums"]) != len(theirs["sums"]):
        return False
    return all(
        abs(a - b) <= _SUM_TOLERANCE * max(1.0, abs(a), abs(b)) for a, b in zip(ours["sums"], theirs["sums"])
    )


def replica_main(spec: ReplicaSpec) -> None:
    """The replica process: join the engine, load, say hello, then serve until told to stop."""
    logging.basicConfig(
        level=spec.log_level, format=f"replica {spec.number}: %(levelname)s %(name)s: %(message)s"
    )
    if spec.threads:
        torch.set_num_threads(spec.threads)
    link = Link.join(Path(spec.store_file), REPLICA_RANK, spec.join_timeout_s)
    try:
        replica = Replica.load(spec)
    except Exception as err:  # the process ends here, and the engine must hear why
        link.send(Message(Kind.HELLO, data={"error": f"{type(err).__name__}: {err}"}))
        raise SystemExit(1) from err
    link.send(Message(Kind.HELLO, data=replica.hello()))
    try:
        replica.serve(link)
    except RuntimeError as err:  # the engine's end is gone (it ended, or was killed): so is this replica
        logger.warning("the engine's link broke (%s): this replica ends", link_error(err))
        raise SystemExit(1) from None


class Replica:
    """One pipeline that commits the engine's changes and makes the frames it is given, in order.

    Args:
        pipeline: its StreamPipeline (same config, same weights, same seed as the engine's).
        backend: its runners' backend (``None``: torch eager), asked for a new shape's runners when a
            change needs them (the engine built them into the shared engine cache first).
    """

    def __init__(self, pipeline: Any, backend: Any, fingerprint: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.backend = backend
        self.fingerprint = fingerprint
        self.serial = 0  # the engine's number of the last change committed here
        self._previous: torch.Tensor | None = None  # the prompt a crossfade starts from
        self._refused: str | None = None  # a change the engine accepted and this replica did not

    @classmethod
    def load(cls, spec: ReplicaSpec) -> Replica:
        from engine.accel.backends import AccelSettings, create_backend
        from engine.accel.base import VaeShape
        from engine.config import Config
        from engine.models.loader import load_models
        from engine.pipeline import PipelineSettings
        from engine.runtime.changes import open_pipeline

        config = Config.model_validate(spec.config)
        models = load_models(config.model, device=spec.device)
        vae_shape = VaeShape(
            config.stream.height, config.stream.width, models.latent_channels, models.vae_scale_factor
        )
        backend = create_backend(models, vae_shape, AccelSettings.from_config(config.acceleration))
        pipeline = open_pipeline(models, PipelineSettings.from_config(config), backend)
        return cls(pipeline, backend, weights_fingerprint(models))

    def hello(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "pid": os.getpid(), "device": str(self.pipeline.device)}

    def serve(self, link: Link) -> None:
        """Messages in order until STOP (or the engine's end of the link goes away)."""
        while True:
            message = link.recv()
            if message.kind is Kind.STOP:
                return
            if message.kind is Kind.CHANGE:
                self.change(message)
            elif message.kind is Kind.FRAME:
                link.send(self.frame(message))

    def change(self, message: Message) -> None:
        """Commit ``values`` (``apply_change``: plan, LoRA weights, commit), as the engine did."""
        from engine.params import ParamError
        from engine.runtime.changes import apply_change, ready_runners

        values = message.data["values"]
        previous = self.pipeline.current_positive
        try:
            target = self.pipeline.target_for(values)
            if target is not None and ready_runners(self.pipeline, self.backend, target) is None:
                self.backend.prepare_unet(target.unet)  # from the engine cache the engine filled
                if target.vae is not None:
                    self.backend.prepare_vae(target.vae)
            apply_change(self.pipeline, values, self.backend)
        except (ParamError, RuntimeError, ValueError) as err:
            self._refused = f"change of {', '.join(sorted(values))} refused here: {err}"
        self.serial = int(message.data["serial"])
        if message.data.get("transition"):
            self._previous = previous
            self.pipeline.set_prompt_transition(previous, 0.0)
        elif any(key in values for key in ("prompt", "prompt_blend", "negative_prompt")):
            self._previous = None

    def frame(self, message: Message) -> Message:
        """Make frame ``index``: its output, or that it was skipped, warming, or failed."""
        pipeline = self.pipeline
        data = message.data
        done = {"serial": self.serial}
        if self._refused is not None:
            return Message(Kind.OUTPUT, message.index, {**done, "error": self._refused})
        image, reference, *controls = message.tensors
        progress = data.get("progress")
        if progress is not None and self._previous is not None:
            pipeline.set_prompt_transition(self._previous, float(progress))
        if reference is not None:
            pipeline.set_reference_tokens(reference.to(pipeline.device, pipeline.dtype))
        if image is not None:
            image = image.to(pipeline.device, pipeline.dtype)
        moved = [None if c is None else c.to(pipeline.device, pipeline.dtype) for c in controls]
        skipped_before = pipeline.stats.skipped
        try:
            output = pipeline(image, moved) if data.get("controls") else pipeline(image)
        except (RuntimeError, ValueError) as err:  # the frame guard, as on the engine's own loop
            return Message(Kind.OUTPUT, message.index, {**done, "error": f"frame failed: {err}"})
        if output is None:
            return Message(Kind.OUTPUT, message.index, {**done, "warming": True})
        if pipeline.stats.skipped != skipped_before:  # the engine repeats the newest output it has
            return Message(Kind.OUTPUT, message.index, {**done, "skipped": True})
        return Message(Kind.OUTPUT, message.index, done, [output])
