"""ControlNets: each adds its residuals, scaled per batch row, to the UNet's down and mid blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from engine.accel.base import Conditioning, GraphIO, UNetShape
from engine.conditioning.preprocess import Preprocess, make_preprocessor
from engine.extensions.base import NO_IO, Change, Extension, FrameInputs, GraphPart, UNetCall
from engine.models.kinds import ControlPreprocessor
from engine.models.sources import DEFAULT_DEPTH_ID
from engine.params import ParamError
from engine.stream.control import ControlSlots, slot_scales
from engine.stream.modes import CfgType, GenerationMode

if TYPE_CHECKING:
    from engine.models.bundle import ModelBundle
    from engine.pipeline import StreamPipeline

CONTROL_INPUTS = ("control_images", "control_scales")


def control_images_shape(shape: UNetShape) -> tuple[int, int, int, int, int]:
    """``(K, B, 3, H, W)``: the control images of ``shape`` (H = h × the VAE's factor)."""
    f = shape.image_scale
    return (shape.controlnets, shape.batch, 3, shape.latent_height * f, shape.latent_width * f)


@dataclass(frozen=True)
class ControlNetSettings:
    """One ``model.controlnets`` entry's settings (its weights are in ``ModelBundle.controlnets``).

    Attributes:
        scale: starting scale (``/controlnet_scales`` changes it live; 0 switches it off).
        preprocessor: what makes the condition image of a frame.
        start, end: the share of the denoising schedule it acts on (diffusers'
            ``control_guidance_start``/``end``).
        from_input: the condition comes from the frame being diffused; False: from its own
            source, handed to each pipeline call (``controls``).
        low_threshold, high_threshold: Canny thresholds.
        depth_id: the depth model of ``preprocessor: depth``.
    """

    scale: float = 1.0
    preprocessor: ControlPreprocessor = ControlPreprocessor.NONE
    start: float = 0.0
    end: float = 1.0
    from_input: bool = True
    low_threshold: float = 0.1
    high_threshold: float = 0.2
    depth_id: str = DEFAULT_DEPTH_ID

    @classmethod
    def from_config(cls, entry: Any) -> ControlNetSettings:
        return cls(
            scale=entry.scale,
            preprocessor=ControlPreprocessor(entry.preprocessor),
            start=entry.start,
            end=entry.end,
            from_input=entry.source is None,
            low_threshold=entry.low_threshold,
            high_threshold=entry.high_threshold,
            depth_id=entry.preprocessor_id,
        )


@dataclass
class ControlPlan:
    """The slots (new only when the layout changed) and each UNet row's scales ``(K, B)``."""

    slots: ControlSlots
    scales: torch.Tensor
    active: tuple[bool, ...]


class ControlNetPart(GraphPart):
    """K ControlNets' residuals summed (as diffusers' ``MultiControlNetModel``), scaled per row.

    Inputs ``control_images (K, B, 3, H, W)`` in [0, 1] and ``control_scales (K, B)`` (a row at 0
    adds nothing); the ControlNets see the text tokens only, as in diffusers' pipelines. The flag
    ``active`` (K bools, eager torch) skips a ControlNet whose scales are all 0.
    """

    inputs = CONTROL_INPUTS

    def __init__(self, controlnets: Sequence[Any]) -> None:
        super().__init__()
        self.controlnets = nn.ModuleList(controlnets)

    def check(self, shape: UNetShape) -> None:
        if len(self.controlnets) != shape.controlnets:
            raise ValueError(
                f"{shape!r} is for {shape.controlnets} ControlNet(s); given {len(self.controlnets)}"
            )

    def before(self, call: UNetCall, tensors: Sequence[torch.Tensor]) -> None:
        images, scales = tensors
        active = call.flags.get("active")
        added = {k: v for k, v in call.kwargs.items() if k == "added_cond_kwargs"}
        for index, controlnet in enumerate(self.controlnets):
            if active and not active[index]:
                continue
            down, mid = controlnet(
                call.latents,
                call.timesteps,
                encoder_hidden_states=call.text,
                controlnet_cond=images[index],
                return_dict=False,
                **added,
            )
            scale = scales[index].to(call.latents.dtype).view(-1, 1, 1, 1)
            call.add_residuals([block * scale for block in down], mid * scale)


class ControlNet(Extension):
    """The configured ControlNets: a preprocessor each, the newest frame of each own source, the
    per-slot conditions of the stream batch (``engine.stream.control``) and their scales.

    Registry parameter ``controlnet_scales``; graph inputs where ``UNetShape.controlnets`` is K.
    """

    name = "controlnet"
    inputs = CONTROL_INPUTS
    params = ("controlnet_scales",)
    absent_reason = "no model.controlnets are configured: there is nothing to scale"

    def __init__(self, pipeline: StreamPipeline) -> None:
        settings = pipeline.settings
        self.configured = settings.controlnets
        self.steps = settings.num_inference_steps
        self.device, self.dtype = pipeline.device, pipeline.dtype
        self.size = (pipeline.height, pipeline.width)
        self.count = len(pipeline.models.controlnets)
        self.preprocessors: list[Preprocess] = [
            make_preprocessor(
                c.preprocessor,
                low_threshold=c.low_threshold,
                high_threshold=c.high_threshold,
                depth_id=c.depth_id,
                device=self.device,
                dtype=self.dtype,
            )
            for c in self.configured
        ]
        self.control_frames: list[torch.Tensor | None] = [None] * len(self.configured)
        state = pipeline.state
        state["controlnet_scales"] = [float(c.scale) for c in self.configured]
        slots = ControlSlots(
            len(self.configured),
            pipeline.batch.n,
            self.size,
            pipeline.batch.cfg_type,
            self.device,
            self.dtype,
        )
        self.control = self._plan_for(state, slots)

    # ------------------------------------------------------------------ graph side
    @classmethod
    def graph_io(cls, shape: UNetShape) -> GraphIO:
        if not shape.controlnets:
            return NO_IO
        return GraphIO(
            dict(zip(CONTROL_INPUTS, (control_images_shape(shape), (shape.controlnets, shape.batch)))), {}
        )

    @classmethod
    def example_inputs(
        cls, shape: UNetShape, generator: torch.Generator, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        return [
            torch.rand(control_images_shape(shape), generator=generator).to(dtype),
            torch.ones((shape.controlnets, shape.batch), dtype=dtype),
        ]

    @classmethod
    def graph_part(cls, shape: UNetShape | None, models: ModelBundle | None) -> GraphPart | None:
        wanted = shape.controlnets if shape is not None else (len(models.controlnets) if models else 0)
        if not wanted:
            return None
        if models is None:
            raise ValueError(f"{shape!r} has {wanted} ControlNet(s): give their weights (a ControlNetPart)")
        part = ControlNetPart(models.controlnets)
        if shape is not None:
            part.check(shape)
        return part

    # ------------------------------------------------------------------ live side
    @classmethod
    def create(cls, pipeline: StreamPipeline) -> ControlNet | None:
        settings, loaded = pipeline.settings.controlnets, len(pipeline.models.controlnets)
        if len(settings) != loaded:
            raise ValueError(
                f"{len(settings)} ControlNet settings for {loaded} loaded "
                "ControlNets; give one per model.controlnets entry"
            )
        if pipeline.settings.mode is GenerationMode.TXT2IMG and any(c.from_input for c in settings):
            raise ValueError("txt2img has no input frames: a ControlNet needs its own source there")
        return cls(pipeline) if settings else None

    def check(self, accepted: dict[str, Any], state: dict[str, Any]) -> None:
        if "controlnet_scales" not in accepted:
            return
        scales = accepted["controlnet_scales"]
        if scales is None:  # "the configured scales" (e.g. a scene saved without ControlNets)
            scales = [float(c.scale) for c in self.configured]
        elif len(scales) != len(self.configured):
            raise ParamError(
                "controlnet_scales",
                f"{len(scales)} scales given; allowed: exactly {len(self.configured)} "
                "(one per model.controlnets entry, in config order)",
            )
        state["controlnet_scales"] = accepted["controlnet_scales"] = list(scales)

    def shape_fields(
        self, state: Mapping[str, Any], n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        return {"controlnets": self.count}

    def plan(self, change: Change) -> ControlPlan | None:
        slots = self.control.slots
        layout = (change.n, change.size, change.cfg_type) != (slots.n, slots.size, slots.cfg_type)
        if layout:
            slots = slots.resized(change.n, change.size, change.cfg_type)
        scales_changed = change.state["controlnet_scales"] != change.old["controlnet_scales"]
        if layout or scales_changed or change.schedule_changed:
            return self._plan_for(change.state, slots)
        return None

    def commit(self, plan: ControlPlan | None, change: Change) -> None:
        self.size = change.size
        if plan is not None:
            self.control = plan

    def frame(self, frame: FrameInputs, conditioning: Conditioning) -> None:
        control = self.control
        conditioning.inputs.update(zip(CONTROL_INPUTS, (self._push_conditions(frame), control.scales)))
        conditioning.flags["active"] = control.active

    def _plan_for(self, state: Mapping[str, Any], slots: ControlSlots) -> ControlPlan:
        """Each UNet row's ControlNet scales for ``state`` (its schedule, cfg mode and scales)."""
        scales, active = slot_scales(
            state["controlnet_scales"],
            [(c.start, c.end) for c in self.configured],
            state["t_index_list"],
            self.steps,
            CfgType(state["cfg_type"]),
        )
        return ControlPlan(slots, scales.to(device=self.device, dtype=self.dtype), active)

    def _push_conditions(self, frame: FrameInputs) -> torch.Tensor:
        """This frame's condition of each active ControlNet into slot 0; the UNet's control images.

        A ControlNet switched off (scale 0) is not preprocessed; its slots refill within n
        frames once it is on again. Before its own source sent anything, its condition is black.
        """
        height, width = self.size
        controls = frame.controls
        conditions: list[torch.Tensor | None] = []
        for index, (settings, preprocess) in enumerate(zip(self.configured, self.preprocessors)):
            if not settings.from_input and controls is not None and controls[index] is not None:
                self.control_frames[index] = controls[index]
            source = frame.image if settings.from_input else self.control_frames[index]
            if not self.control.active[index]:
                conditions.append(None)
            elif source is None:
                conditions.append(torch.zeros((1, 3, height, width), device=self.device, dtype=self.dtype))
            else:
                source = source.to(device=self.device, dtype=self.dtype)
                if tuple(source.shape[-2:]) != (height, width):
                    source = torch.nn.functional.interpolate(
                        source, size=(height, width), mode="bilinear", antialias=True
                    )
                conditions.append(preprocess(source))
        slots = self.control.slots
        slots.push(conditions)
        return slots.unet_images()
