"""SDXL's added conditioning: the UNet call also takes pooled text embeddings and the size's time ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.accel.base import Conditioning, GraphIO, UNetShape
from engine.extensions.base import NO_IO, Extension, FrameInputs, GraphPart, UNetCall
from engine.stream.modes import CfgType
from engine.stream.pooled import split_pooled, time_ids

if TYPE_CHECKING:
    from engine.models.bundle import ModelBundle
    from engine.pipeline import StreamPipeline

ADDED_INPUTS = ("text_embeds", "time_ids")


class AddedPart(GraphPart):
    """``added_cond_kwargs`` of the UNet (and of the parts after it) from two graph inputs."""

    inputs = ADDED_INPUTS

    def before(self, call: UNetCall, tensors: Sequence[torch.Tensor]) -> None:
        text_embeds, ids = tensors
        call.kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": ids}


class AddedConditioning(Extension):
    """SDXL: the pooled token travels first in the laid-out embeddings and is split off here.

    Graph inputs ``text_embeds (B, P)`` and ``time_ids (B, 6)`` where ``UNetShape.pooled_dim`` is P.
    """

    name = "sdxl"
    inputs = ADDED_INPUTS

    def __init__(self, pooled_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.pooled_dim = pooled_dim
        self.device, self.dtype = device, dtype
        self.text_embeds: torch.Tensor | None = None  # (B, P) of the current layout
        self.time_ids: torch.Tensor | None = None  # (B, 6) of the current size

    # ------------------------------------------------------------------ graph side
    @classmethod
    def graph_io(cls, shape: UNetShape) -> GraphIO:
        if not shape.pooled_dim:
            return NO_IO
        return GraphIO(dict(zip(ADDED_INPUTS, ((shape.batch, shape.pooled_dim), (shape.batch, 6)))), {})

    @classmethod
    def example_inputs(
        cls, shape: UNetShape, generator: torch.Generator, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        height, width = shape.latent_height * shape.image_scale, shape.latent_width * shape.image_scale
        return [
            torch.randn((shape.batch, shape.pooled_dim), generator=generator).to(dtype),
            time_ids(height, width, shape.batch, torch.device("cpu"), dtype),
        ]

    @classmethod
    def graph_part(cls, shape: UNetShape | None, models: ModelBundle | None) -> GraphPart | None:
        pooled = shape.pooled_dim if shape is not None else (models.pooled_dim if models is not None else 0)
        return AddedPart() if pooled else None

    # ------------------------------------------------------------------ live side
    @classmethod
    def create(cls, pipeline: StreamPipeline) -> AddedConditioning | None:
        pooled_dim = pipeline.models.pooled_dim
        return cls(pooled_dim, pipeline.device, pipeline.dtype) if pooled_dim else None

    def shape_fields(
        self, state: Any, n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        return {"pooled_dim": self.pooled_dim}

    def extend_prompt(
        self, state: Any, positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An empty negative prompt is zeros for SDXL (as diffusers)."""
        if not state["negative_prompt"]:
            negative = torch.zeros_like(negative)
        return positive, negative

    def take_embeddings(self, embeddings: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The tokens ``(B, L, D)`` for the UNet; keeps the pooled ``(B, P)`` and the time ids."""
        tokens, self.text_embeds = split_pooled(embeddings, self.pooled_dim)
        height, width = size
        self.time_ids = time_ids(height, width, embeddings.shape[0], self.device, self.dtype)
        return tokens

    def conditioning(self) -> Conditioning:
        """``text_embeds (B, P)`` and ``time_ids (B, 6)`` of the UNet call now (they follow no frame)."""
        added = Conditioning()
        self.frame(FrameInputs(None, None), added)
        return added

    def frame(self, frame: FrameInputs, conditioning: Conditioning) -> None:
        assert self.text_embeds is not None and self.time_ids is not None
        conditioning.inputs.update(zip(ADDED_INPUTS, (self.text_embeds, self.time_ids)))


def sdxl_inputs(pipeline: StreamPipeline) -> Conditioning | None:
    """SDXL's added inputs of a pipeline's UNet call now (``AddedConditioning.conditioning``); None for SD."""
    added = pipeline.extensions.get(AddedConditioning.name)
    return added.conditioning() if isinstance(added, AddedConditioning) else None
