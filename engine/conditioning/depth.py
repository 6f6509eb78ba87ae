"""Monocular depth as a ControlNet condition, from a Depth Anything model loaded like any other."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from engine.models.device import resolve_device
from engine.models.errors import ModelLoadError, short_reason
from engine.models.sources import DEFAULT_DEPTH_ID, TINY_DEPTH_ID, local_path, looks_like_hub_id

__all__ = [
    "DEFAULT_DEPTH_ID",
    "DEPTH_ACCEPTED",
    "TINY_DEPTH_ID",
    "DepthEstimator",
    "build_tiny_depth_model",
]

logger = logging.getLogger(__name__)

DEPTH_ACCEPTED = (
    f"Give a depth-estimation hub id (e.g. {DEFAULT_DEPTH_ID}), a local transformers folder "
    f"(config.json and weights), or {TINY_DEPTH_ID}."
)
TINY_DEPTH_INPUT_SIZE = 56  # 4×4 patches of 14: the tiny model runs in milliseconds on a CPU

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RANGE_EPSILON = 1e-6  # a depth map flatter than this normalizes to zeros, not NaN
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


def build_tiny_depth_model(seed: int = 0) -> torch.nn.Module:
    """A random-weight tiny Depth Anything (``builtin:tiny-depth``): about 120 k parameters, 56² input.

    A ``DepthAnythingForDepthEstimation`` on a 4-layer, 32-wide, 2-head DINOv2 backbone (one layer
    per DPT reassemble stage, of which Depth Anything has four), built offline
    (``use_pretrained_backbone=False``). Convolution and linear weights are He-normal with zero
    biases, so the map follows the image (the default init gives an almost flat map). Seeded inside
    ``torch.random.fork_rng``: the same seed gives the same weights and the global RNG is left as it
    was. CPU, float32, eval mode, no parameter requires grad.
    """
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    # options the configs take through **kwargs (not in their typed signatures)
    backbone_options: dict[str, Any] = {"out_features": ["stage1", "stage2", "stage3", "stage4"]}
    offline_options: dict[str, Any] = {"use_pretrained_backbone": False}
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=TINY_DEPTH_INPUT_SIZE,
        patch_size=14,
        reshape_hidden_states=False,
        **backbone_options,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        patch_size=14,
        **offline_options,
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
    """Depth maps of frames: ``(N, 3, H, W)`` float in [-1, 1] → ``(N, 3, H, W)`` in [0, 1], channels equal.

    Each frame is mapped to [0, 1], resized (bilinear, antialiased) to a square ``input_size`` ×
    ``input_size`` (a multiple of ``patch``; one fixed shape whatever the frame size),
    ImageNet-normalized and run through the model under ``torch.inference_mode()``. Its
    ``predicted_depth`` ``(N, h, w)`` is resized back to ``(H, W)`` and normalized per image by its
    own min and max (on the device: no host sync); a flat map gives zeros, not NaN. Depth Anything
    predicts relative inverse depth (larger = nearer), so near is bright without a flip — the format
    depth ControlNets (lllyasviel/control_v11f1p_sd15_depth) expect. The result has the input's
    dtype and device; the model runs in its own dtype and device.
    """

    def __init__(self, model: torch.nn.Module, input_size: int = 518, patch: int = 14) -> None:
        """Wrap ``model`` (a transformers depth-estimation model or anything returning ``predicted_depth``).

        Raises:
            ValueError: ``input_size`` or ``patch`` is not a positive integer.
        """
        if patch < 1 or input_size < 1:
            raise ValueError(f"depth input_size {input_size}, patch {patch}; allowed: positive integers")
        self.model = model
        self.input_size = max(patch, round(input_size / patch) * patch)
        self._host_normalization = (
            torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1),
            torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1),
        )
        self._normalization: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"DepthEstimator({type(self.model).__name__}, input_size={self.input_size})"

    @classmethod
    def load(cls, model_id: str, device: torch.device | str, dtype: torch.dtype) -> DepthEstimator:
        """The depth model ``model_id`` on ``device`` in ``dtype``, ready to call.

        Args:
            model_id: ``builtin:tiny-depth`` (random tiny weights, 56² input), a hub id such as
                ``depth-anything/Depth-Anything-V2-Small-hf`` or a local transformers folder.
            device: a torch device, or a name ``resolve_device`` takes (``auto``, ``cuda``, ``cpu``…).
            dtype: the weights' dtype.

        Raises:
            ModelLoadError: the id is none of these, the folder or hub model cannot be loaded
                (offline, not a depth model), or the device name is unknown or unavailable; the
                message names ``model_id`` (or the device) and what is accepted.
        """
        target = resolve_device(device) if isinstance(device, str) else device
        name = model_id.strip()
        if name == TINY_DEPTH_ID:
            model = build_tiny_depth_model().to(device=target, dtype=dtype)
            logger.info("built %s (random weights) on %s", TINY_DEPTH_ID, target)
            return cls(model, input_size=TINY_DEPTH_INPUT_SIZE)
        if name.startswith("builtin:"):
            raise ModelLoadError(f"unknown builtin depth model {model_id!r}. {DEPTH_ACCEPTED}")
        folder = local_path(name)
        if not folder.is_dir() and not looks_like_hub_id(name):
            raise ModelLoadError(
                f"depth model {model_id!r} is not an existing folder, nor a hub id of the form "
                f"org/name. {DEPTH_ACCEPTED}"
            )
        from transformers import AutoModelForDepthEstimation

        try:
            # ``torch_dtype``: the name every supported transformers takes (5.x keeps it as ``dtype``'s alias)
            loaded = AutoModelForDepthEstimation.from_pretrained(
                str(folder) if folder.is_dir() else name, torch_dtype=dtype
            )
        except _LOAD_ERRORS as err:
            raise ModelLoadError(_load_failure(model_id, folder.is_dir(), err)) from err
        logger.info("loaded depth model %s on %s (%s)", model_id, target, dtype)
        return cls(loaded.to(device=target, dtype=dtype).eval().requires_grad_(False))

    def _normalization_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageNet mean and std ``(1, 3, 1, 1)`` float32 on ``device`` (copied there once, then cached)."""
        constants = self._normalization.get(device)
        if constants is None:
            mean, std = self._host_normalization
            constants = (mean.to(device), std.to(device))
            self._normalization[device] = constants
        return constants

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Depth of ``images`` ``(N, 3, H, W)`` in [-1, 1] → ``(N, 3, H, W)`` in [0, 1], near = bright.

        Raises:
            ValueError: ``images`` is not a floating ``(N, 3, H, W)`` tensor.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"depth input of shape {tuple(images.shape)} and dtype {images.dtype}; "
                "allowed: a floating (N, 3, H, W) tensor in [-1, 1]"
            )
        height, width = images.shape[-2:]
        model_device, model_dtype = _placement(self.model, images.device)
        mean, std = self._normalization_on(images.device)

        pixels = (images.float() * 0.5 + 0.5).clamp_(0.0, 1.0)
        size = (self.input_size, self.input_size)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        pixels = (pixels - mean) / std
        predicted = self.model(pixel_values=pixels.to(device=model_device, dtype=model_dtype)).predicted_depth

        depth = predicted.to(device=images.device, dtype=torch.float32).unsqueeze(1)  # (N, 1, h, w)
        depth = F.interpolate(
            depth, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
        nearest = depth.amax(dim=(2, 3), keepdim=True)
        farthest = depth.amin(dim=(2, 3), keepdim=True)
        normalized = ((depth - farthest) / (nearest - farthest).clamp_min(_RANGE_EPSILON)).clamp_(0.0, 1.0)
        return normalized.to(images.dtype).expand(-1, 3, -1, -1).contiguous()


def _placement(model: torch.nn.Module, fallback: torch.device) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``model``'s first parameter (``fallback``, float32: it has none)."""
    weight = next(model.parameters(), None)
    return (fallback, torch.float32) if weight is None else (weight.device, weight.dtype)


def _load_failure(model_id: str, is_folder: bool, err: BaseException) -> str:
    """The one-line message for a folder or hub depth model that failed to load."""
    reason = short_reason(err)
    if is_folder:
        return (
            f"depth model folder {model_id!r} could not be loaded as a transformers depth-estimation "
            f"model: {reason}. {DEPTH_ACCEPTED}"
        )
    return (
        f"depth model {model_id!r} is not a local folder and could not be fetched from the hub "
        f"(offline?): {reason}. {DEPTH_ACCEPTED}"
    )
