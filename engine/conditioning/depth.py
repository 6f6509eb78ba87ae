"""Monocular depth as a ControlNet condition, from a small model loaded like any other."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from engine.models.errors import ModelLoadError, short_reason
from engine.models.sources import DEFAULT_DEPTH_ID, TINY_DEPTH_ID, local_path, looks_like_hub_id

logger = logging.getLogger(__name__)

DEPTH_ACCEPTED = (
    f"Give a depth-estimation hub id (e.g. {DEFAULT_DEPTH_ID}), a local transformers folder, "
    f"or {TINY_DEPTH_ID}."
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)


def build_tiny_depth_model(seed: int = 0) -> Any:
    """A random tiny Depth Anything (``builtin:tiny-depth``, about 120 k parameters, 56² input).

    He-normal weights with zero biases, so its output varies with the image (default random
    init gives an almost constant map). Seeded; the global RNG is left as it was. CPU, float32.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    # keyword arguments the configs take through **kwargs (not in their typed signatures)
    stages: dict[str, Any] = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    offline: dict[str, Any] = {"use_pretrained_backbone": False}
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        reshape_hidden_states=False,
        **stages,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
        **offline,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
    return model.eval().requires_grad_(False)


class DepthEstimator:
    """``(N, 3, H, W)`` frame in [-1, 1] → ``(N, 3, H, W)`` depth in [0, 1], channels equal.

    The frame is resized to ``input_size`` (a multiple of ``patch``), ImageNet-normalized and
    run through the model; its ``predicted_depth`` (relative inverse depth: larger = nearer) is
    resized back and normalized per image by its own min and max, so near is bright — the format
    depth ControlNets (control_v11f1p_sd15_depth) expect. A constant depth map gives zeros.
    """

    def __init__(self, model: Any, input_size: int = 518, patch: int = 14) -> None:
        self.model = model
        self.input_size = max(patch, round(input_size / patch) * patch)
        self._mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)

    @classmethod
    def load(cls, model_id: str, device: torch.device | str, dtype: torch.dtype) -> DepthEstimator:
        """The depth model ``model_id`` on ``device`` in ``dtype``.

        Raises:
            ModelLoadError: naming ``model_id`` and what is accepted.
        """
        name = model_id.strip()
        if name == TINY_DEPTH_ID:
            return cls(build_tiny_depth_model().to(device=device, dtype=dtype), input_size=56)
        if name.startswith("builtin:"):
            raise ModelLoadError(f"unknown builtin depth model {model_id!r}. {DEPTH_ACCEPTED}")
        path = local_path(name)
        if not path.is_dir() and not looks_like_hub_id(name):
            raise ModelLoadError(f"depth model {model_id!r} is not a folder nor a hub id. {DEPTH_ACCEPTED}")
        from transformers import AutoModelForDepthEstimation

        try:
            model = AutoModelForDepthEstimation.from_pretrained(str(path) if path.is_dir() else name)
        except _LOAD_ERRORS as err:
            raise ModelLoadError(
                f"depth model {model_id!r} could not be loaded (offline?): {short_reason(err)}. "
                + DEPTH_ACCEPTED
            ) from err
        logger.info("loaded depth model %s", model_id)
        return cls(model.to(device=device, dtype=dtype).eval().requires_grad_(False))

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        dtype = next(self.model.parameters()).dtype
        x = ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        depth = self.model(pixel_values=x.to(dtype)).predicted_depth.float().unsqueeze(1)
        depth = F.interpolate(depth, size=(height, width), mode="bilinear")
        low = depth.amin(dim=(2, 3), keepdim=True)
        high = depth.amax(dim=(2, 3), keepdim=True)
        normalized = (depth - low) / (high - low).clamp_min(1e-6)
        return normalized.expand(-1, 3, -1, -1).to(images.dtype).contiguous()
