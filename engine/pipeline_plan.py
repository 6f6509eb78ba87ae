"""What a StreamPipeline hands out: its runners, the plan of a live change, its counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.accel.base import UNetRunner, UNetShape, VaeRunner, VaeShape
from engine.extensions.base import Change


@dataclass(frozen=True)
class Runners:
    """The UNet and VAE runners a pipeline calls (``engine.accel``); torch eager by default."""

    unet: UNetRunner
    vae: VaeRunner


@dataclass(frozen=True)
class BuildTarget:
    """Runners a change needs before it can commit: a UNet shape and, for a new size, the VAE's."""

    unet: UNetShape
    vae: VaeShape | None = None

    @property
    def label(self) -> str:
        """``batch 3`` or ``batch 2 at 768x512``: what is being built, for logs and the status."""
        if self.vae is None:
            return f"batch {self.unet.batch}"
        return f"batch {self.unet.batch} at {self.vae.width}x{self.vae.height}"


@dataclass(frozen=True)
class LoraChange:
    """New scales for the configured LoRAs (``Backend.set_lora_scales`` applies them)."""

    old: list[float]
    new: list[float]
    text_encoder: bool  # the text encoder's weights change too: prompts are encoded again


@dataclass
class ChangePlan:
    """Everything a live change makes, computed by ``StreamPipeline.plan``; nothing is in use yet.

    ``commit`` swaps it in. ``target`` names the runners it needs when its shapes differ from
    the ones playing; ``lora`` the weight change the backend makes before the commit;
    ``change`` what the extensions were shown and ``extensions`` what each of them planned.
    """

    accepted: dict[str, Any]
    state: dict[str, Any]
    version: int
    unet_shape: UNetShape
    vae_shape: VaeShape
    target: BuildTarget | None
    latent_shape: tuple[int, int, int]
    batch_plan: dict[str, object]
    positive: torch.Tensor
    negative: torch.Tensor
    embeddings: torch.Tensor
    layout_changed: bool
    lora: LoraChange | None
    change: Change
    extensions: dict[str, Any] = field(default_factory=dict)  # each extension's plan, by name

    @property
    def size_changed(self) -> bool:
        return self.target is not None and self.target.vae is not None


@dataclass
class PipelineStats:
    """Counters since start (plain ints; read by the runtime's status thread)."""

    frames_in: int = 0
    frames_out: int = 0
    skipped: int = 0
    unet_calls: int = 0
    vae_encodes: int = 0
    vae_decodes: int = 0
