"""Cross-frame attention: the UNet's self-attention layers attend across the stream batch's frames."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.accel.base import UNetShape
from engine.extensions.base import Change, Extension
from engine.stream.attention import CrossFrameAttnProcessor
from engine.stream.guidance import batch_groups_for
from engine.stream.modes import CfgType

if TYPE_CHECKING:
    from engine.pipeline import StreamPipeline


class CrossFrameAttention(Extension):
    """Every ``attn1`` layer through ``CrossFrameAttnProcessor`` over the batch's groups of rows.

    No graph inputs: the groups (``UNetShape.cross_frame_groups``) are baked into the graph and
    name it in the engine cache key. Fixed at start (``stream.cross_frame_attention``).
    """

    name = "cross_frame"

    def __init__(self, pipeline: StreamPipeline) -> None:
        unet = pipeline.models.unet
        self.processor = CrossFrameAttnProcessor(batch_groups_for(pipeline.batch.cfg_type, pipeline.batch.n))
        processors = {
            name: (self.processor if name.endswith("attn1.processor") else current)
            for name, current in unet.attn_processors.items()
        }
        unet.set_attn_processor(processors)

    # ------------------------------------------------------------------ graph side
    @classmethod
    def prepare_export(cls, unet: Any, shape: UNetShape) -> None:
        """attn1 through ``CrossFrameAttnProcessor(shape.cross_frame_groups)``, or, without groups,
        plain attention (a cross-frame processor the caller installed is replaced)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        groups = shape.cross_frame_groups
        _check_groups(groups, shape)
        processor: Any = CrossFrameAttnProcessor(groups) if groups is not None else None
        processors = {}
        for name, current in unet.attn_processors.items():
            if name.endswith("attn1.processor") and processor is not None:
                processors[name] = processor
            elif isinstance(current, CrossFrameAttnProcessor):  # a feature bank's processors too
                processors[name] = AttnProcessor2_0()
            else:
                processors[name] = current
        unet.set_attn_processor(processors)

    @classmethod
    def identity(cls, shape: UNetShape) -> dict[str, Any]:
        return {"cross_frame_groups": repr(shape.cross_frame_groups)}

    # ------------------------------------------------------------------ live side
    @classmethod
    def create(cls, pipeline: StreamPipeline) -> CrossFrameAttention | None:
        return cls(pipeline) if pipeline.settings.cross_frame_attention else None

    def shape_fields(
        self, state: Mapping[str, Any], n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        return {"cross_frame_groups": batch_groups_for(cfg_type, n)}

    def commit(self, plan: Any, change: Change) -> None:
        self.processor.groups = batch_groups_for(change.cfg_type, change.n)


def _check_groups(groups: tuple[tuple[int, int], ...] | None, shape: UNetShape) -> None:
    """The cross-frame groups tile ``[0, batch)``."""
    if groups is None:
        return
    edge, tiles = 0, bool(groups)
    for start, stop in groups:
        tiles = tiles and start == edge and stop > start
        edge = stop
    if not (tiles and edge == shape.batch):
        raise ValueError(
            f"cross_frame_groups {groups} must be consecutive (start, stop) ranges "
            f"covering [0, {shape.batch})"
        )
