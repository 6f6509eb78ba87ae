"""The backend seam: fixed-shape UNet and VAE calls, tensors in and out."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Conditioning:
    """What a UNet call takes besides latents, timesteps and embeddings, by graph input name.

    The extensions (``engine.extensions``) fill it once per frame: SDXL's ``text_embeds (B, P)``
    and ``time_ids (B, 6)``, the ControlNets' ``control_images (K, B, 3, H, W)`` in [0, 1] and
    ``control_scales (K, B)``, the IP-Adapter's ``ip_scale (1,)``, the feature cache's
    ``feature_bank (F, B, N)``, ``feature_bias (F,)`` and ``feature_injection (2,)``, ...

    Attributes:
        inputs: graph input name → tensor (the names and shapes of ``UNetShape.io``).
        flags: host-side values for eager torch only (e.g. ``active``: which ControlNets run;
            ``injecting``: whether the feature injection has a strength); exported graphs take
            the tensors and run everything.
        outputs: graph output name → the list a runner appends that output to (one per call);
            only the outputs asked for (``want``) are kept.
    """

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def want(self, name: str) -> list[torch.Tensor]:
        """Ask the runner for the graph output ``name``; the list it will append to."""
        return self.outputs.setdefault(name, [])

    def give(self, name: str, tensor: torch.Tensor) -> None:
        """A runner hands back the graph output ``name`` (kept where it was asked for)."""
        wanted = self.outputs.get(name)
        if wanted is not None:
            wanted.append(tensor)


class UNetRunner(Protocol):
    """``(latents (B, C, h, w), timesteps (B,) int64, embeddings (B, L, D)) -> (B, C, h, w)``.

    B is fixed per configuration (n, n + 1 or 2n); the prediction is ε or v as the model's.
    ``conditioning`` carries the extensions' inputs (``engine.extensions``) by graph input name.
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
PREDICTION = "prediction"
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
        options: what other registered extensions add, ``(name, value)`` pairs (``option``).

    The fields after the text's are the built-in extensions' (``engine.extensions``); each
    extension reads its own and declares its graph inputs and outputs from them.
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
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        """The value an extension called ``name`` put in ``options`` (``default``: it is absent)."""
        return dict(self.options).get(name, default)

    @property
    def latents(self) -> tuple[int, int, int, int]:
        return (self.batch, self.latent_channels, self.latent_height, self.latent_width)

    @property
    def embeddings(self) -> tuple[int, int, int]:
        return (self.batch, self.text_length, self.text_dim)

    @property
    def io(self) -> GraphIO:
        """``latents, timesteps (batch,) int64, embeddings`` and each registered extension's inputs,
        in registration order ``-> prediction`` (shape of latents) and the extensions' outputs."""
        from engine.extensions import registered  # the extensions import this module

        inputs: dict[str, tuple[int, ...]] = dict(
            zip(UNET_INPUTS, (self.latents, (self.batch,), self.embeddings))
        )
        outputs: dict[str, tuple[int, ...]] = {PREDICTION: self.latents}
        for extension in registered():
            part = extension.graph_io(self)
            inputs.update(part.inputs)
            outputs.update(part.outputs)
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
        ValueError: ``conditioning`` lacks an input the graph has (naming it).
    """
    feeds = dict(zip(UNET_INPUTS, (latents, timesteps, embeddings)))
    given = {} if conditioning is None else conditioning.inputs
    missing = [name for name in input_names if name not in feeds and name not in given]
    if missing:
        names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        raise ValueError(
            f"this UNet graph takes {names} too: give them in the Conditioning (its extensions' "
            f"inputs; given: {sorted(given) or 'none'})"
        )
    for name in input_names:
        if name not in feeds:
            feeds[name] = given[name]
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



