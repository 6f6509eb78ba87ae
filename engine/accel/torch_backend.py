"""Eager PyTorch backend: call the diffusers modules directly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.accel.base import Conditioning
from engine.extensions import graph_parts
from engine.extensions.base import GraphPart
from engine.models.conditioned import ConditionedUNet


class TorchUNet:
    """``UNetRunner`` over a diffusers ``UNet2DConditionModel`` (or its ``torch.compile`` wrapper).

    ``parts``: the extensions' graph parts it may run (``engine.extensions.graph_parts``); each
    call runs the ones whose inputs its ``Conditioning`` gives, and hands their outputs back.

    ``replays_graphs``: the module is compiled with ``mode="reduce-overhead"`` and replays CUDA
    graphs, whose output buffers the next replay overwrites; each call then marks a new step
    and hands back a copy (``(B, 4, h, w)``, a few hundred KB), so the stream batch may keep it.
    """

    def __init__(self, unet: Any, replays_graphs: bool = False, parts: Sequence[GraphPart] = ()) -> None:
        self.unet = unet
        self.replays_graphs = replays_graphs
        self.parts = list(parts)
        self._image_tokens = sum(part.image_tokens for part in self.parts)
        self._modules: dict[frozenset[str], ConditionedUNet] = {}  # by the inputs a call gives

    @classmethod
    def of(cls, models: Any, unet: Any = None, replays_graphs: bool = False) -> TorchUNet:
        """The runner of a ``ModelBundle``'s UNet with every extension part its models can run
        (``engine.extensions.graph_parts``; ``unet``: another module for it, e.g. compiled)."""
        return cls(models.unet if unet is None else unet, replays_graphs, graph_parts(None, models))

    def _module(self, given: frozenset[str]) -> ConditionedUNet:
        module = self._modules.get(given)
        if module is None:
            chosen = [p for p in self.parts if p.inputs and set(p.inputs) <= given]
            known = {name for part in chosen for name in part.inputs}
            if known != given:
                raise ValueError(
                    f"this UNet runs no extension that takes {sorted(given - known)}; its parts take "
                    f"{sorted(name for part in self.parts for name in part.inputs)}"
                )
            module = self._modules[given] = ConditionedUNet(self.unet, chosen, self._image_tokens)
        return module

    @torch.inference_mode()
    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        if self.replays_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        given = conditioning.inputs if conditioning is not None else {}
        module = self._module(frozenset(given))
        extras = [given[name] for name in module.input_names]
        flags = conditioning.flags if conditioning is not None else None
        out = module(latents, timesteps, embeddings, *extras, flags=flags)
        if isinstance(out, torch.Tensor):
            return out.clone() if self.replays_graphs else out
        prediction, *more = out
        assert conditioning is not None
        names = module.output_names
        for name, tensor in zip(names, more):
            conditioning.give(name, tensor.clone() if self.replays_graphs else tensor)
        return prediction.clone() if self.replays_graphs else prediction


class TorchVae:
    """``VaeRunner`` over ``AutoencoderTiny`` (TAESD) or ``AutoencoderKL``.

    Latents are multiplied by ``scaling_factor`` after encoding and divided before decoding;
    ``AutoencoderKL`` encodes to its distribution's mode (no per-frame sampling noise). A VAE
    kept in float32 under a float16 pipeline (SDXL's) gets its inputs cast to float32 and
    gives its outputs back in the caller's dtype; where the dtypes match the casts are no-ops.
    """

    def __init__(self, vae: Any, scaling_factor: float) -> None:
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.dtype = next(vae.parameters()).dtype

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images.to(self.dtype), return_dict=False)[0]
        # AutoencoderTiny gives the latent tensor; AutoencoderKL a distribution: take its mode
        latents = encoded if isinstance(encoded, torch.Tensor) else encoded.mode()
        return (latents * self.scaling_factor).to(images.dtype)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype), return_dict=False)[0]
        return images.to(latents.dtype)
