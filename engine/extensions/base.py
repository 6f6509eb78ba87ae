"""The extension protocol: one class per thing that changes the UNet call, declared in one place.

An extension has two sides.

* The **graph side** (class methods and a ``GraphPart`` module) is a function of a ``UNetShape``:
  the graph inputs and outputs it adds (``graph_io``), example tensors for the export, the module
  that runs inside ``ConditionedUNet`` (eager torch, ONNX export, TensorRT alike), what it does
  to a copied UNet before the export, and its part of the engine cache key. Exporters, the
  TensorRT profile and the runners iterate over the registered extensions; none names one.
* The **live side** (an instance, made by ``StreamPipeline`` when configured) follows the change
  path: ``check`` validates its registry parameters, ``shape_fields`` says what it adds to the
  UNet shape, ``plan`` makes its tensors off the frame loop, ``commit`` swaps them in between
  two frames; per frame ``frame`` puts its inputs into the ``Conditioning`` and ``after_frame``
  reads the graph's outputs back.

A new extension is one module with a subclass, registered with ``engine.extensions.register``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from engine.accel.base import Conditioning, GraphIO, UNetShape
from engine.stream.modes import CfgType

if TYPE_CHECKING:
    from engine.models.bundle import ModelBundle
    from engine.pipeline import StreamPipeline


NO_IO = GraphIO({}, {})


@dataclass
class UNetCall:
    """One call of the UNet as the graph parts shape it (inside ``ConditionedUNet.forward``).

    Attributes:
        unet: the diffusers UNet being called.
        latents, timesteps, embeddings: the call's core inputs ``(B, C, h, w)``, ``(B,)`` int64,
            ``(B, L, D)`` (L counts the image tokens that parts append after the text tokens).
        image_tokens: T, how many of ``embeddings``' tokens are image tokens (``text`` drops them).
        flags: host-side values of eager torch (e.g. which of a part's models run); exported graphs
            get none and run everything.
        kwargs: keyword arguments of the diffusers UNet call (``added_cond_kwargs``,
            ``down_block_additional_residuals``, ...).
        attention: the ``cross_attention_kwargs`` the attention processors receive.
        prediction: the UNet's output ``(B, C, h, w)``, set after the call; parts may change it.
        notes: what a part keeps from ``before`` to ``after`` of this call (by its own key).
    """

    unet: Any
    latents: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor
    image_tokens: int = 0
    flags: Mapping[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    prediction: torch.Tensor | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> torch.Tensor:
        """The text tokens of ``embeddings`` ``(B, L - T, D)`` (for parts that attend to text only)."""
        if not self.image_tokens:
            return self.embeddings
        return self.embeddings[:, : self.embeddings.shape[1] - self.image_tokens]

    def add_residuals(self, down: Sequence[torch.Tensor], mid: torch.Tensor) -> None:
        """Add residuals to the UNet's down and mid blocks (summed over every caller)."""
        kwargs = self.kwargs
        old_down = kwargs.get("down_block_additional_residuals")
        if old_down is None:
            kwargs["down_block_additional_residuals"] = list(down)
            kwargs["mid_block_additional_residual"] = mid
        else:
            kwargs["down_block_additional_residuals"] = [a + b for a, b in zip(old_down, down)]
            kwargs["mid_block_additional_residual"] = kwargs["mid_block_additional_residual"] + mid


class GraphPart(nn.Module):
    """The module side of an extension: runs inside ``ConditionedUNet`` (and so in every graph).

    ``inputs``: the graph inputs it takes, in ``graph_io`` order; ``outputs``: the graph outputs it
    gives after the prediction; ``image_tokens``: tokens it appends to the prompt embeddings.
    """

    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    image_tokens: int = 0

    def check(self, shape: UNetShape) -> None:
        """``ValueError`` when this part cannot run in the graph of ``shape`` (e.g. other weights)."""

    def before(self, call: UNetCall, tensors: Sequence[torch.Tensor]) -> None:
        """Shape the call from this part's input tensors (in ``inputs`` order)."""

    def after(self, call: UNetCall) -> list[torch.Tensor]:
        """After the UNet ran: change ``call.prediction`` if it must; returns its outputs."""
        return []


@dataclass(frozen=True)
class Change:
    """What a live change proposes, as the extensions' ``plan`` sees it (nothing is in use yet).

    Attributes:
        state: the full new state (registry names → canonical values); ``old``: the one playing.
        n, cfg_type, size: the new stream batch length, guidance mode and ``(height, width)``.
        unet_shape: the UNet shape the new state runs at.
        schedule_changed, prompt_changed, seed_changed: what else changes with it.
    """

    state: Mapping[str, Any]
    old: Mapping[str, Any]
    n: int
    cfg_type: CfgType
    size: tuple[int, int]
    unet_shape: UNetShape
    schedule_changed: bool
    prompt_changed: bool
    seed_changed: bool


@dataclass(frozen=True)
class FrameInputs:
    """One frame as the extensions' ``frame`` sees it.

    ``image``: the input frame ``(1, 3, H, W)`` in [-1, 1] on the pipeline's device (None in
    txt2img); ``controls``: the newest frames of the extensions' own sources (the pipeline
    call's ``controls``), or None.
    """

    image: torch.Tensor | None
    controls: Sequence[torch.Tensor | None] | None


class Extension:
    """One thing that changes the UNet call; see the module docstring for the two sides."""

    #: the extension's name (``StreamPipeline.extensions`` key, cache-key and log name)
    name: ClassVar[str] = ""
    #: the registry parameters (``engine.params``) whose values ``check`` canonicalises
    params: ClassVar[tuple[str, ...]] = ()
    #: why a value of ``params`` is refused where the extension is not configured
    absent_reason: ClassVar[str] = "it is not configured"
    #: its settings under ``extensions.<name>`` in config.yaml (pydantic model; None: it takes none
    #: there; the built-ins have their own sections), in ``PipelineSettings.extensions[name]``
    config_model: ClassVar[type[BaseModel] | None] = None
    #: the graph input and output names it may add (``graph_io`` gives their shapes)
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ graph side
    @classmethod
    def graph_io(cls, shape: UNetShape) -> GraphIO:
        """The inputs and outputs this extension adds to the UNet graph of ``shape`` (none: absent)."""
        return NO_IO

    @classmethod
    def example_inputs(
        cls, shape: UNetShape, generator: torch.Generator, dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Tensors to trace the export with, one per ``graph_io(shape).inputs``; random normal by default."""
        return [
            torch.randn(dims, generator=generator).to(dtype) for dims in cls.graph_io(shape).inputs.values()
        ]

    @classmethod
    def graph_part(cls, shape: UNetShape | None, models: ModelBundle | None) -> GraphPart | None:
        """The module this extension runs in the UNet graph of ``shape`` (None: the graph of any shape
        ``models`` can run; ``models`` None: from the shape alone), or None when it adds no module."""
        return None

    @classmethod
    def prepare_export(cls, unet: Any, shape: UNetShape) -> None:
        """Change the export's own copy of the UNet for ``shape`` (e.g. its attention processors)."""

    @classmethod
    def identity(cls, shape: UNetShape) -> dict[str, Any]:
        """This extension's part of the engine cache key of ``shape`` (beyond what its IO names)."""
        return {}

    # ------------------------------------------------------------------ live side
    @classmethod
    def create(cls, pipeline: StreamPipeline) -> Extension | None:
        """The live extension of a pipeline being built, or None where it is not configured.

        Called once the pipeline has its models, settings, state and stream batch. Raises
        ``ValueError`` for settings that cannot work, ``ParamError`` for a bad starting value.
        """
        return None

    @classmethod
    def check_absent(cls, accepted: Mapping[str, Any]) -> None:
        """Where the pipeline has no instance: its parameters may only be None ("as configured").

        Raises:
            ParamError: naming the parameter and why there is nothing to change.
        """
        from engine.params import ParamError

        for name in cls.params:
            if accepted.get(name) is not None:
                raise ParamError(name, cls.absent_reason)

    def check(self, accepted: dict[str, Any], state: dict[str, Any]) -> None:
        """Validate and canonicalise this extension's parameters in ``accepted`` and ``state`` in place.

        Raises:
            ParamError: naming the parameter, the bad value and what is allowed.
        """

    def start(self, state: Mapping[str, Any], shape: UNetShape) -> None:
        """The pipeline is built and runs at ``shape`` (its prompts are encoded)."""

    def shape_fields(
        self, state: Mapping[str, Any], n: int, cfg_type: CfgType, latent_shape: tuple[int, int, int]
    ) -> dict[str, Any]:
        """What ``state`` at stream batch length ``n``, guidance ``cfg_type`` and latent ``(C, h, w)``
        adds to the UNet shape (``UNetShape`` field names → values; ``options``: pairs to add)."""
        return {}

    def plan(self, change: Change) -> Any:
        """Everything ``change`` needs from this extension, made now (None: nothing to do)."""
        return None

    def commit(self, plan: Any, change: Change) -> None:
        """Swap ``plan`` in between two frames (cannot fail)."""

    def frame(self, frame: FrameInputs, conditioning: Conditioning) -> None:
        """Put this frame's graph inputs into ``conditioning`` (and ask for outputs)."""

    def after_frame(self, conditioning: Conditioning) -> None:
        """Read what the UNet call gave back (``conditioning.outputs``)."""

    def take_embeddings(self, embeddings: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The UNet's prompt embeddings from the laid-out ones (an extension may take a part)."""
        return embeddings

    def extend_prompt(
        self, state: Mapping[str, Any], positive: torch.Tensor, negative: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded prompts with what this extension appends (e.g. image tokens)."""
        return positive, negative
