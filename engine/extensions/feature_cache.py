"""The feature cache (StreamV2V): past frames' self-attention features join each UNet call's keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.accel.base import Conditioning, GraphIO, UNetShape
from engine.extensions.base import NO_IO, Change, Extension, FrameInputs, GraphPart, UNetCall
from engine.stream.feature_bank import FeatureBankAttnProcessor, FeatureCache, FeatureLayout, feature_layout
from engine.stream.guidance import batch_groups_for
from engine.stream.modes import CfgType

if TYPE_CHECKING:
    from engine.models.bundle import ModelBundle
    from engine.pipeline import StreamPipeline

FEATURE_INPUTS = ("feature_bank", "feature_bias", "feature_injection")
FEATURES = "features"


@dataclass
class FeaturePlan:
    """A new bank (another layout), or forget the old one's slots (a new prompt or seed)."""

    cache: FeatureCache | None
    reset: bool


class FeatureBankPart(GraphPart):
    """Inputs ``feature_bank (F, B, N)``, ``feature_bias (F,)`` and ``feature_injection (2,)``
    for the UNet's ``FeatureBankAttnProcessor`` s; output this call's attn1 features ``(B, N)``.
    The flag ``injecting`` False (eager torch) skips the injection (its strength is 0)."""

    inputs = FEATURE_INPUTS
    outputs = (FEATURES,)

    def __init__(self) -> None:
        super().__init__()
        self._layouts: dict[tuple[int, int], FeatureLayout] = {}  # by latent size: not per frame

    def before(self, call: UNetCall, tensors: Sequence[torch.Tensor]) -> None:
        bank, bias, injection = tensors
        size = (int(call.latents.shape[-2]), int(call.latents.shape[-1]))
        layout = self._layouts.get(size)
        if layout is None:
            layout = self._layouts[size] = feature_layout(call.unet, *size)
        captured: list[torch.Tensor | None] = [None] * len(layout.names)
        call.notes[FEATURES] = captured
        call.attention.update(
            feature_bank=layout.split(bank),
            feature_bias=bias,
            feature_injection=injection if call.flags.get("injecting", True) else None,
            captured=captured,
        )

    def after(self, call: UNetCall) -> list[torch.Tensor]:
        captured = call.notes[FEATURES]
        if any(c is None for c in captured):
            raise ValueError("the UNet's attn1 layers do not all carry FeatureBankAttnProcessor")
        return [torch.cat([c for c in captured if c is not None], dim=1)]


class FeatureCacheExtension(Extension):
    """The bank of past frames' attn1 features, live-switchable (``feature_cache_*`` parameters).

    Graph inputs and the output ``features`` where ``UNetShape.feature_frames`` is F > 0.
    """

    name = "feature_cache"
    inputs = FEATURE_INPUTS
    outputs = (FEATURES,)

    def __init__(self, pipeline: StreamPipeline) -> None:
        self.models = pipeline.models
        self.device, self.dtype = pipeline.device, pipeline.dtype
        self.cross_frame = pipeline.settings.cross_frame_attention
        self.groups = batch_groups_for(pipeline.batch.cfg_type, pipeline.batch.n)
        self.processors: list[FeatureBankAttnProcessor] = []
        self.before_bank: dict[str, Any] | None = None
        self.cache: FeatureCache | None = None

    def start(self, state: Mapping[str, Any], shape: UNetShape) -> None:
        """At pipeline start, once the UNet shape is known: install the bank if it is on."""
        if state["feature_cache_enabled"]:
            self._install()
            self.cache = FeatureCache(
                shape.feature_frames, shape.batch, shape.feature_size, self.device, self.dtype
            )
            self._configure(state)

    # ------------------------------------------------------------------ graph side
    @classmethod
    def graph_io(cls, shape: UNetShape) -> GraphIO:
        if not shape.feature_frames:
            return NO_IO
        frames, size = shape.feature_frames, shape.feature_size
        return GraphIO(
            dict(zip(FEATURE_INPUTS, ((frames, shape.batch, size), (frames,), (2,)))),
            {FEATURES: (shape.batch, size)},
        )

    @classmethod
    def example_inputs(
        cls, shape: UNetShape, generator: torch.Generator, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        return [
            torch.randn((shape.feature_frames, shape.batch, shape.feature_size), generator=generator).to(
                dtype
            ),
            torch.zeros((shape.feature_frames,), dtype=dtype),
            torch.tensor([0.5, 0.9], dtype=dtype),
        ]

    @classmethod
    def graph_part(cls, shape: UNetShape | None, models: ModelBundle | None) -> GraphPart | None:
        return FeatureBankPart() if shape is None or shape.feature_frames else None

    @classmethod
    def prepare_export(cls, unet: Any, shape: UNetShape) -> None:
        from engine.models.feature_cache import install_feature_bank

        if shape.feature_frames:
            install_feature_bank(unet, shape.cross_frame_groups)

    @classmethod
    def identity(cls, shape: UNetShape) -> dict[str, Any]:
        return {"feature_frames": shape.feature_frames} if shape.feature_frames else {}

    # ------------------------------------------------------------------ live side
    @classmethod
    def create(cls, pipeline: StreamPipeline) -> FeatureCacheExtension:
        return cls(pipeline)  # always there: it can be switched on live

    def shape_fields(
        self, state: Mapping[str, Any], n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        if not state["feature_cache_enabled"]:
            return {}
        _, height, width = latent_shape
        size = feature_layout(self.models.unet, height, width).total  # every attn1 layer, one row
        return {"feature_frames": int(state["feature_cache_frames"]), "feature_size": size}

    def plan(self, change: Change) -> FeaturePlan | None:
        """A new bank when the cache turns on or its layout (F, B, N) changes; otherwise whether
        a new prompt or seed makes the cached features stale."""
        if not change.state["feature_cache_enabled"]:
            return None
        shape = change.unet_shape
        layout = (shape.feature_frames, shape.batch, shape.feature_size)
        if self.cache is None or tuple(self.cache.bank.shape) != layout:
            return FeaturePlan(FeatureCache(*layout, self.device, self.dtype), reset=False)
        return FeaturePlan(None, reset=change.prompt_changed or change.seed_changed)

    def commit(self, plan: FeaturePlan | None, change: Change) -> None:
        self.groups = batch_groups_for(change.cfg_type, change.n)
        enabled = change.state["feature_cache_enabled"]
        if enabled and self.before_bank is None:
            self._install()
        elif not enabled and self.before_bank is not None:
            from engine.models.feature_cache import restore

            restore(self.models.unet, self.before_bank)
            self.before_bank, self.processors = None, []
        if not enabled:
            self.cache = None
            return
        if plan is not None and plan.cache is not None:
            self.cache = plan.cache
        elif plan is not None and plan.reset and self.cache is not None:
            self.cache.reset()
        self._configure(change.state)
        for processor in self.processors:
            processor.groups = self.groups if self.cross_frame else None

    def frame(self, frame: FrameInputs, conditioning: Conditioning) -> None:
        cache = self.cache
        if cache is None:
            return
        conditioning.inputs.update(zip(FEATURE_INPUTS, (cache.bank, cache.bias, cache.injection)))
        conditioning.flags["injecting"] = cache.injecting
        conditioning.want(FEATURES)

    def after_frame(self, conditioning: Conditioning) -> None:
        features = conditioning.outputs.get(FEATURES)
        if self.cache is not None and features:
            self.cache.push(features[-1])  # this frame's features, for the next frames

    def _configure(self, state: Mapping[str, Any]) -> None:
        assert self.cache is not None
        self.cache.configure(
            state["feature_cache_interval"],
            state["feature_cache_strength"],
            state["feature_cache_injection"],
            state["feature_cache_threshold"],
        )

    def _install(self) -> None:
        from engine.models.feature_cache import install_feature_bank  # diffusers: on first use

        groups = self.groups if self.cross_frame else None
        self.processors, self.before_bank = install_feature_bank(self.models.unet, groups)
