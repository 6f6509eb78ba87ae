"""IP-Adapter: a reference image's tokens after the prompt's, weighed by a scale in the attention."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.accel.base import Conditioning, GraphIO, UNetShape
from engine.conditioning.image_prompt import ImagePrompts
from engine.extensions.base import NO_IO, Change, Extension, FrameInputs, GraphPart, UNetCall
from engine.params import ParamError
from engine.stream.modes import CfgType

if TYPE_CHECKING:
    from engine.models.bundle import ModelBundle
    from engine.pipeline import StreamPipeline

IP_INPUTS = ("ip_scale",)
_KEYS = ("ip_adapter_scale", "ip_adapter_image")


class IpScalePart(GraphPart):
    """The graph input ``ip_scale (1,)`` handed to the attention processors (``IpAttnProcessor``);
    ``image_tokens`` T of them end the embeddings."""

    inputs = IP_INPUTS

    def __init__(self, image_tokens: int = 0) -> None:
        super().__init__()
        self.image_tokens = int(image_tokens)

    def before(self, call: UNetCall, tensors: Sequence[torch.Tensor]) -> None:
        call.attention["ip_scale"] = tensors[0]


class IpAdapter(Extension):
    """The reference image (a file in the presets folder, or a bridge's newest frame) and its scale.

    Registry parameters ``ip_adapter_scale`` and ``ip_adapter_image``; the graph input ``ip_scale``
    where ``UNetShape.ip_adapter`` (its tokens are counted in ``text_length``).
    """

    name = "ip_adapter"
    inputs = IP_INPUTS
    params = _KEYS
    absent_reason = "no model.ip_adapter is configured: there is no reference image to steer by"

    def __init__(self, pipeline: StreamPipeline) -> None:
        settings = pipeline.settings
        self.device, self.dtype = pipeline.device, pipeline.dtype
        self.configured_scale = float(settings.ip_adapter_scale)
        self.from_source = settings.ip_adapter_from_source
        self.image_prompts = ImagePrompts(pipeline.models.ip_adapter, settings.image_folder)
        if settings.ip_adapter_image is not None:
            self.image_prompts.path(settings.ip_adapter_image)  # ParamError: not in the presets folder
        self.scale = self.scale_for(pipeline.state)

    # ------------------------------------------------------------------ graph side
    @classmethod
    def graph_io(cls, shape: UNetShape) -> GraphIO:
        return GraphIO({IP_INPUTS[0]: (1,)}, {}) if shape.ip_adapter else NO_IO

    @classmethod
    def example_inputs(
        cls, shape: UNetShape, generator: torch.Generator, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        return [torch.ones((1,), dtype=dtype)]

    @classmethod
    def graph_part(cls, shape: UNetShape | None, models: ModelBundle | None) -> GraphPart | None:
        tokens = models.ip_tokens if models is not None else 0
        present = shape.ip_adapter if shape is not None else tokens > 0
        return IpScalePart(tokens) if present else None

    # ------------------------------------------------------------------ live side
    @classmethod
    def create(cls, pipeline: StreamPipeline) -> IpAdapter | None:
        return None if pipeline.models.ip_adapter is None else cls(pipeline)

    def check(self, accepted: dict[str, Any], state: dict[str, Any]) -> None:
        for name in _KEYS:
            if name in accepted:
                state[name] = accepted[name] = self._checked(name, accepted[name])

    def _checked(self, name: str, value: Any) -> Any:
        if name == "ip_adapter_scale":
            return self.configured_scale if value is None else value
        if value is not None and self.from_source:
            raise ParamError(
                name, f"{value!r} refused: the reference image comes from model.ip_adapter.source (a bridge)"
            )
        if value is not None:
            self.image_prompts.path(value)  # ParamError when it is not a file in the presets folder
        return value

    def shape_fields(
        self, state: Mapping[str, Any], n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        return {"ip_adapter": True}

    def scale_for(self, state: Mapping[str, Any]) -> torch.Tensor:
        """The scale ``(1,)`` of ``state``: 0 without a reference image."""
        referenced = state["ip_adapter_image"] is not None or self.image_prompts.live is not None
        scale = float(state["ip_adapter_scale"]) if referenced else 0.0
        return torch.tensor([scale], device=self.device, dtype=self.dtype)

    def plan(self, change: Change) -> torch.Tensor | None:
        if any(change.state[k] != change.old[k] for k in _KEYS):
            return self.scale_for(change.state)
        return None

    def commit(self, plan: torch.Tensor | None, change: Change) -> None:
        if plan is not None:
            self.scale = plan

    def frame(self, frame: FrameInputs, conditioning: Conditioning) -> None:
        conditioning.inputs[IP_INPUTS[0]] = self.scale

    def extend_prompt(
        self, state: Mapping[str, Any], positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image tokens after the text tokens (``IpAttnProcessor`` splits them off)."""
        image = self.image_prompts.reference(state["ip_adapter_image"]).to(positive.dtype)
        empty = self.image_prompts.tokens(None).to(negative.dtype)
        return torch.cat([positive, image], dim=1), torch.cat([negative, empty], dim=1)

    def with_reference(
        self, tokens: torch.Tensor, positive: torch.Tensor, state: Mapping[str, Any]
    ) -> torch.Tensor:
        """``positive`` ``(1, L + T, D)`` with ``tokens`` ``(1, T, D)`` as its image tokens; they stay
        the reference (``live``) until the next ones; the scale follows."""
        tokens = tokens.to(device=self.device, dtype=positive.dtype)
        text = positive[:, : positive.shape[1] - tokens.shape[1]]
        self.image_prompts.live = tokens
        self.scale = self.scale_for(state)
        return torch.cat([text, tokens], dim=1)
