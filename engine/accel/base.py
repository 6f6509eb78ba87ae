"""The backend seam: fixed-shape UNet and VAE calls, tensors in and out."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Conditioning:
    """What a UNet call takes besides latents, timesteps and embeddings (SDXL, ControlNets, IP-Adapter).

    Attributes:
        control_images: ``(K, B, 3, H, W)`` in [0, 1], each batch row the condition of the frame
            that row came from (``engine.stream.control``).
        control_scales: ``(K, B)``: each ControlNet's scale per batch row (0: adds nothing).
        active: K host-side bools: False where a ControlNet's scales are all 0 (eager torch then
            skips it; exported graphs take the scales as inputs and run it anyway).
        ip_scale: ``(1,)``: the IP-Adapter scale (0: the image adds nothing).
        text_embeds: SDXL's pooled text embeddings ``(B, P)``, laid out like the embeddings.
        time_ids: SDXL's ``add_time_ids`` ``(B, 6)`` (``engine.stream.pooled.time_ids``).
        feature_bank: the feature cache ``(F, B, N)`` of past frames (``engine.stream.feature_bank``).
        feature_bias: ``(F,)`` attention bias per cached slot (log strength; empty: -1e4).
        feature_injection: ``(2,)``: injection strength and cosine threshold.
        feature_out: where the runner puts this call's features ``(B, N)`` (a list it appends to).
        injecting: host-side: the injection strength is above 0 (eager torch skips the nearest-
            neighbour search otherwise; exported graphs take the strength as an input).
    """

    control_images: torch.Tensor | None = None
    control_scales: torch.Tensor | None = None
    active: tuple[bool, ...] = ()
    ip_scale: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    feature_bank: torch.Tensor | None = None
    feature_bias: torch.Tensor | None = None
    feature_injection: torch.Tensor | None = None
    feature_out: list[torch.Tensor] | None = None
    injecting: bool = True


class UNetRunner(Protocol):
    """``(latents (B, C, h, w), timesteps (B,) int64, embeddings (B, L, D)) -> (B, C, h, w)``.

    B is fixed per configuration (n, n + 1 or 2n); the prediction is ε or v as the model's.
    ``conditioning`` carries the SDXL, ControlNet and IP-Adapter inputs when the model has them.
    """

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor: ...


class VaeRunner(Protocol):
    """Encode images ``(1, 3, H, W)`` in [-1, 1] to scaled latents ``(1, C, H/f, W/f)``.

    ``decode`` maps latents back to images in about [-1, 1].
    """

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


UNET_INPUTS = ("latents", "timesteps", "embeddings")
ADDED_INPUTS = ("text_embeds", "time_ids")
CONTROL_INPUTS = ("control_images", "control_scales")
IP_INPUTS = ("ip_scale",)
FEATURE_INPUTS = ("feature_bank", "feature_bias", "feature_injection")
UNET_OUTPUTS = ("prediction", "features")
VAE_IMAGES, VAE_LATENTS = "images", "latents"
"""IO names of the exported graphs (the VAE encoder maps images → latents, the decoder back);
the runners bind by these names (``GraphIO``)."""


@dataclass(frozen=True)
class GraphIO:
    """Names → static shapes of one exported graph's inputs and outputs, in graph order."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class UNetShape:
    """Everything that fixes the shapes of one exported / built UNet.

    Attributes:
        batch: UNet batch per frame (n, n + 1 or 2n by cfg mode).
        latent_channels, latent_height, latent_width: latent ``(C, h, w)``.
        text_length, text_dim: prompt embeddings ``(L, D)`` (77 and the text encoder width).
        cross_frame_groups: ``(start, stop)`` batch ranges attending to each other (cross-frame
            attention), or ``None`` for plain self-attention.
        controlnets: K ControlNets in the graph (inputs ``control_images`` and ``control_scales``).
        image_scale: control-image pixels per latent pixel (the VAE's factor).
        ip_adapter: an IP-Adapter in the graph (input ``ip_scale``; its tokens are counted in
            ``text_length``).
        pooled_dim: SDXL: P of the pooled text embeddings (inputs ``text_embeds (B, P)`` and
            ``time_ids (B, 6)``); 0: SD, no added conditioning.
        feature_frames, feature_size: the feature cache's F slots of N values per row (inputs
            ``feature_bank (F, B, N)``, ``feature_bias (F,)``, ``feature_injection (2,)``; output
            ``features (B, N)``); 0: no feature cache.
    """

    batch: int
    latent_channels: int
    latent_height: int
    latent_width: int
    text_length: int = 77
    text_dim: int = 768
    cross_frame_groups: tuple[tuple[int, int], ...] | None = None
    controlnets: int = 0
    image_scale: int = 8
    ip_adapter: bool = False
    pooled_dim: int = 0
    feature_frames: int = 0
    feature_size: int = 0

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return (self.batch, self.latent_channels, self.latent_height, self.latent_width)

    @property
    def embeddings(self) -> tuple[int, int, int]:
        return (self.batch, self.text_length, self.text_dim)

    @property
    def control_images(self) -> tuple[int, int, int, int, int]:
        f = self.image_scale
        return (self.controlnets, self.batch, 3, self.latent_height * f, self.latent_width * f)

    @property
    def io(self) -> GraphIO:
        """``latents, timesteps (batch,) int64, embeddings [, text_embeds, time_ids]
        [, control_images, control_scales] [, ip_scale] [, feature_bank, feature_bias,
        feature_injection] -> prediction`` (shape of latents) ``[, features]``."""
        inputs: dict[str, tuple[int, ...]] = dict(
            zip(UNET_INPUTS, (self.latents, (self.batch,), self.embeddings))
        )
        if self.pooled_dim:
            inputs.update(zip(ADDED_INPUTS, ((self.batch, self.pooled_dim), (self.batch, 6))))
        if self.controlnets:
            inputs.update(zip(CONTROL_INPUTS, (self.control_images, (self.controlnets, self.batch))))
        if self.ip_adapter:
            inputs[IP_INPUTS[0]] = (1,)
        outputs: dict[str, tuple[int, ...]] = {UNET_OUTPUTS[0]: self.latents}
        if self.feature_frames:
            frames, size = self.feature_frames, self.feature_size
            inputs.update(zip(FEATURE_INPUTS, ((frames, self.batch, size), (frames,), (2,))))
            outputs[UNET_OUTPUTS[1]] = (self.batch, size)
        return GraphIO(inputs, outputs)


def unet_feeds(
    input_names: Collection[str],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: torch.Tensor,
    conditioning: Conditioning | None,
) -> dict[str, torch.Tensor]:
    """The named inputs of a UNet graph with ``input_names`` (in ``UNetShape.io`` order).

    Raises:
        ValueError: the graph has SDXL's added inputs or ControlNets and ``conditioning`` lacks them.
    """
    feeds = dict(zip(UNET_INPUTS, (latents, timesteps, embeddings)))
    if ADDED_INPUTS[0] in input_names:
        if conditioning is None or conditioning.text_embeds is None or conditioning.time_ids is None:
            raise ValueError("this UNet graph is SDXL's: give its text_embeds and time_ids (Conditioning)")
        feeds.update(zip(ADDED_INPUTS, (conditioning.text_embeds, conditioning.time_ids)))
    if CONTROL_INPUTS[0] in input_names:
        if conditioning is None or conditioning.control_images is None or conditioning.control_scales is None:
            raise ValueError(
                "this UNet graph has ControlNets: give its control_images and control_scales (Conditioning)"
            )
        feeds.update(zip(CONTROL_INPUTS, (conditioning.control_images, conditioning.control_scales)))
    if IP_INPUTS[0] in input_names:
        ip_scale = None if conditioning is None else conditioning.ip_scale
        feeds[IP_INPUTS[0]] = ip_scale if ip_scale is not None else latents.new_zeros((1,))
    if FEATURE_INPUTS[0] in input_names:
        if conditioning is None or conditioning.feature_bank is None:
            raise ValueError("this UNet graph has a feature cache: give its feature_bank (Conditioning)")
        assert conditioning.feature_bias is not None and conditioning.feature_injection is not None
        feeds.update(
            zip(
                FEATURE_INPUTS,
                (conditioning.feature_bank, conditioning.feature_bias, conditioning.feature_injection),
            )
        )
    return feeds


@dataclass(frozen=True)
class VaeShape:
    """Image ``(1, 3, H, W)`` ↔ latent ``(1, C, H/f, W/f)`` of one exported VAE."""

    height: int
    width: int
    latent_channels: int = 4
    scale_factor: int = 8

    @property
    def image(self) -> tuple[int, int, int, int]:
        return (1, 3, self.height, self.width)

    @property
    def latent(self) -> tuple[int, int, int, int]:
        f = self.scale_factor
        return (1, self.latent_channels, self.height // f, self.width // f)

    @property
    def encoder_io(self) -> GraphIO:
        """``images (1, 3, H, W) -> latents`` of the exported encoder."""
        return GraphIO({VAE_IMAGES: self.image}, {VAE_LATENTS: self.latent})

    @property
    def decoder_io(self) -> GraphIO:
        """``latents -> images (1, 3, H, W)`` of the exported decoder."""
        return GraphIO({VAE_LATENTS: self.latent}, {VAE_IMAGES: self.image})



