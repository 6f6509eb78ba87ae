"""The builtin models: random-weight tiny SD/SDXL and real architectures, and the trained ``shapes``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.models import shapes, tiny, trained
from engine.models.errors import ModelLoadError
from engine.models.kinds import ModelFamily
from engine.models.sources import BUILTIN_NAMES, BUILTIN_PREFIX
from engine.stream.modes import PredictionType, allowed

logger = logging.getLogger(__name__)

VAE_CHOICES = ("taesd", "full")


@dataclass(frozen=True)
class BuiltinSpec:
    """The configs one builtin model is built from (diffusers / transformers keyword arguments)."""

    unet: Mapping[str, Any]
    taesd: Mapping[str, Any]
    vae: Mapping[str, Any]
    text: Mapping[str, Any]
    about: str
    family: ModelFamily = ModelFamily.SD
    text_2: Mapping[str, Any] | None = None  # SDXL's second text encoder (with projection)
    weights: Path | None = None  # trained weights shipped in the package (else seeded random)


BUILTIN_SPECS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(
        tiny.UNET_CONFIG,
        tiny.TAESD_CONFIG,
        tiny.VAE_CONFIG,
        tiny.TEXT_CONFIG,
        "tiny random-weight SD-style model (256x256, runs anywhere)",
    ),
    "sd-turbo-shape": BuiltinSpec(
        shapes.SD_TURBO_UNET_CONFIG,
        shapes.TAESD_REAL_CONFIG,
        shapes.SD_VAE_CONFIG,
        shapes.SD_TURBO_TEXT_CONFIG,
        "stabilityai/sd-turbo's exact architecture with seeded random weights (benchmarks)",
    ),
    "tiny-sdxl": BuiltinSpec(
        tiny.SDXL_UNET_CONFIG,
        tiny.TAESD_CONFIG,
        tiny.VAE_CONFIG,
        tiny.TEXT_CONFIG,
        "tiny random-weight SDXL-style model (two text encoders, pooled + time ids; 256x256)",
        ModelFamily.SDXL,
        tiny.SDXL_TEXT_2_CONFIG,
    ),
    "sdxl-turbo-shape": BuiltinSpec(
        shapes.SDXL_TURBO_UNET_CONFIG,
        shapes.TAESD_REAL_CONFIG,
        shapes.SDXL_VAE_CONFIG,
        shapes.SDXL_TEXT_CONFIG,
        "stabilityai/sdxl-turbo's exact architecture with seeded random weights (benchmarks)",
        ModelFamily.SDXL,
        shapes.SDXL_TEXT_2_CONFIG,
    ),
    "shapes": BuiltinSpec(
        trained.SHAPES_UNET_CONFIG,
        trained.SHAPES_TAESD_CONFIG,
        tiny.VAE_CONFIG,
        trained.SHAPES_TEXT_CONFIG,
        "trained here on drawn shapes, patterns and colours (128x128; follows colour/pattern prompts)",
        weights=trained.SHAPES_WEIGHTS,
    ),
}
assert tuple(BUILTIN_SPECS) == BUILTIN_NAMES, "sources.BUILTIN_NAMES lists the builtin models"

_SEED_OFFSETS = {"unet": 0, "taesd": 1, "vae": 2, "text_encoder": 3, "text_encoder_2": 4}

_M = TypeVar("_M")


@dataclass
class BuiltinModels:
    """A builtin model's parts, on the CPU in float32, in eval mode without gradients.

    Attributes (``builtin:tiny`` shapes; ``builtin:sd-turbo-shape`` has sd-turbo's: latents
    ``(B,4,64,64)`` at 512², embeddings ``(B,77,1024)``):
        unet: ``UNet2DConditionModel``; ``unet(latents (B,4,32,32), t (B,), emb (B,77,32)).sample``.
        vae: ``AutoencoderTiny`` (TAESD layout) or ``AutoencoderKL``; 256² image <-> 32² latent.
        text_encoder: ``CLIPTextModel``; ``text_encoder(ids (B,77))[0]`` is ``(B,77,32)``.
        tokenizer: ``CLIPTokenizer`` with ``model_max_length`` 77, vocabulary of 1000.
        scheduler_config: an LCM scheduler config (SD scaled_linear betas, 1000 steps).
        identity: ``{"model": "builtin:<name>", "seed": seed, "vae": vae}``.
        family: SD, or SDXL with ``text_encoder_2`` (``CLIPTextModelWithProjection``) and
            ``tokenizer_2`` (the same local tokenizer).
    """

    unet: UNet2DConditionModel
    vae: AutoencoderTiny | AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    identity: dict[str, Any] = field(default_factory=dict)
    family: ModelFamily = ModelFamily.SD
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None


def _seeded(seed: int, factory: Callable[[], _M]) -> _M:
    """Build a module with the CPU RNG seeded, restoring the global RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
    return _frozen(module)


def _frozen(module: _M) -> _M:
    """``module`` in eval mode without gradients."""
    prepared: Any = module
    prepared.eval()
    prepared.requires_grad_(False)
    return module


def _calibration_images(size: int = 64) -> torch.Tensor:
    """Four fixed colourful images ``(4, 3, size, size)`` in [-1, 1] (no RNG involved)."""
    axis = torch.linspace(0.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = []
    for k in range(4):
        phase = 1.7 * k
        images.append(
            torch.stack(
                [
                    torch.sin(6.0 * x + phase),
                    torch.cos(5.0 * y - phase),
                    torch.sin(4.0 * (x + y) + 2 * phase),
                ]
            )
        )
    return torch.stack(images)


def _rescale_output(
    conv: torch.nn.Conv2d, output: torch.Tensor, mean: float, std: float, channels: int
) -> None:
    """Scale and shift ``conv``'s first ``channels`` outputs to the given mean and std."""
    observed_mean = output[:, :channels].mean(dim=(0, 2, 3))
    observed_std = output[:, :channels].std(dim=(0, 2, 3)).clamp_min(1e-6)
    scale = std / observed_std
    conv.weight[:channels] *= scale.view(-1, 1, 1, 1)
    assert conv.bias is not None
    conv.bias[:channels] = (conv.bias[:channels] - observed_mean) * scale + mean


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread for a while (the calibration's result must not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _calibrate_vae(vae: Any) -> None:
    """Give the random VAE a usable range: latents ~ N(0, 1) after scaling, images mid-grey ± colour.

    With plain random weights the tiny TAESD decodes everything to black (about -1.1), so
    the offline demo would show a black screen. Rescaling the last layer of the encoder and
    of the decoder on fixed images keeps the weights deterministic and the output visible
    and input-dependent; it stays a random-weight model, not a trained one.
    """
    images = _calibration_images()
    if isinstance(vae, AutoencoderTiny):
        taesd: Any = vae  # diffusers' modules are untyped for mypy
        encoder_out = taesd.encoder.layers[-1]
        _rescale_output(encoder_out, taesd.encoder(images), 0.0, 1.0, encoder_out.out_channels)
        decoder_out = taesd.decoder.layers[-1]
        latents = taesd.encoder(images)
        hidden = taesd.decoder.layers[:-1](torch.tanh(latents / 3) * 3)
        _rescale_output(decoder_out, decoder_out(hidden), 0.5, 0.2, decoder_out.out_channels)
        return
    channels = vae.config.latent_channels
    scale = float(vae.config.scaling_factor)
    quant = vae.quant_conv
    moments = quant(vae.encoder(images)) if quant is not None else vae.encoder(images)
    target = quant if quant is not None else vae.encoder.conv_out
    _rescale_output(target, moments, 0.0, 1.0 / scale, channels)
    latents = vae.encode(images).latent_dist.mode()
    decoder_out = vae.decoder.conv_out
    captured: dict[str, torch.Tensor] = {}
    hook = decoder_out.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
    vae.decode(latents)
    hook.remove()
    _rescale_output(decoder_out, captured["out"], 0.0, 0.4, decoder_out.out_channels)


def _spec(name: str) -> BuiltinSpec:
    try:
        return BUILTIN_SPECS[name]
    except KeyError:
        choices = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_SPECS)
        raise ModelLoadError(f"unknown builtin model {BUILTIN_PREFIX}{name}: use {choices}.") from None


def build_builtin_vae(name: str, seed: int = 0, vae: str = "taesd") -> AutoencoderTiny | AutoencoderKL:
    """Only the VAE of builtin ``name`` (the same weights ``build_builtin_models`` gives it).

    A trained builtin (``shapes``) has a trained TAESD only; its ``full`` VAE is random, for the
    bench's diffusers peer, which times one (``build_builtin_models`` refuses it).

    Raises:
        ModelLoadError: unknown ``name`` or ``vae``.
    """
    spec = _spec(name)
    if vae not in VAE_CHOICES:
        raise ModelLoadError(f"unknown vae {vae!r} for {BUILTIN_PREFIX}{name}: use taesd | full.")
    if spec.weights is not None and vae == "taesd":
        return _trained_vae(spec, *_trained_state(name, spec.weights))
    if spec.weights is not None:  # the bench's diffusers peer times a full VAE: random, for speed only
        logger.info("%s%s has no trained full VAE: a random one (for timing only)", BUILTIN_PREFIX, name)
    image_vae: AutoencoderTiny | AutoencoderKL
    if vae == "taesd":
        image_vae = _seeded(seed + _SEED_OFFSETS["taesd"], lambda: AutoencoderTiny(**spec.taesd))
    else:
        image_vae = _seeded(seed + _SEED_OFFSETS["vae"], lambda: AutoencoderKL(**spec.vae))
    with _one_thread():  # a multi-threaded reduction may round differently: every process the same weights
        _calibrate_vae(image_vae)
    return image_vae


def build_builtin_models(
    name: str, seed: int = 0, vae: str = "taesd", prediction_type: str = "epsilon"
) -> BuiltinModels:
    """Build builtin ``name``; same ``seed`` gives the same weights, the global RNG is untouched.

    Each part is seeded on its own, so the UNet and text encoder do not depend on ``vae``.
    ``sd-turbo-shape`` allocates sd-turbo's full size (about 1.3 G parameters, 5 GB in float32),
    ``sdxl-turbo-shape`` sdxl-turbo's (about 3.5 G parameters, 14 GB in float32).

    Args:
        name: ``tiny``, ``sd-turbo-shape``, ``tiny-sdxl`` or ``sdxl-turbo-shape`` (no ``builtin:``).
        seed: weight seed.
        vae: ``taesd`` (``AutoencoderTiny``, scaling 1.0) or ``full`` (``AutoencoderKL``,
            scaling 0.18215).
        prediction_type: ``epsilon`` or ``v_prediction``, written into the scheduler config.

    Raises:
        ModelLoadError: unknown ``name``, ``vae`` or ``prediction_type``.
    """
    spec = _spec(name)
    if vae not in VAE_CHOICES:
        raise ModelLoadError(f"unknown vae {vae!r} for {BUILTIN_PREFIX}{name}: use taesd | full.")
    try:
        PredictionType(prediction_type)
    except ValueError as err:
        raise ModelLoadError(
            f"unknown prediction_type {prediction_type!r}: use {allowed(PredictionType)}."
        ) from err
    if spec.weights is not None:
        return _trained_models(name, spec, vae, prediction_type)
    logger.info("building %s%s (seed %d, vae %s, %s)", BUILTIN_PREFIX, name, seed, vae, prediction_type)
    unet = _seeded(seed + _SEED_OFFSETS["unet"], lambda: UNet2DConditionModel(**spec.unet))
    text_encoder = _seeded(
        seed + _SEED_OFFSETS["text_encoder"], lambda: CLIPTextModel(CLIPTextConfig(**spec.text))
    )
    text_2 = spec.text_2
    text_encoder_2 = (
        None
        if text_2 is None
        else _seeded(
            seed + _SEED_OFFSETS["text_encoder_2"],
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_2)),
        )
    )
    return BuiltinModels(
        unet=unet,
        vae=build_builtin_vae(name, seed, vae),
        text_encoder=text_encoder,
        tokenizer=tiny.load_tiny_tokenizer(),
        scheduler_config=tiny.tiny_scheduler_config(prediction_type),
        identity={"model": BUILTIN_PREFIX + name, "seed": seed, "vae": vae},
        family=spec.family,
        text_encoder_2=text_encoder_2,
        tokenizer_2=None if text_encoder_2 is None else tiny.load_tiny_tokenizer(),
    )


def build_tiny_models(seed: int = 0, vae: str = "taesd", prediction_type: str = "epsilon") -> BuiltinModels:
    """``builtin:tiny`` (see ``build_builtin_models``)."""
    return build_builtin_models("tiny", seed, vae, prediction_type)


def _trained_state(name: str, weights: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """The trained parts' float32 state dicts by part (``unet``, ``vae``, ``text_encoder``) and the
    file's metadata.

    Raises:
        ModelLoadError: the weights file is missing or unreadable.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as handle:
            metadata = dict(handle.metadata() or {})
            parts: dict[str, dict[str, torch.Tensor]] = {}
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                part, _, rest = key.partition(".")
                parts.setdefault(part, {})[rest] = handle.get_tensor(key).float()
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(
            f"the trained weights of {BUILTIN_PREFIX}{name} cannot be read at {weights}: {err}. "
            "Reinstall latentstage, or train them with scripts/train_builtin.py."
        ) from err
    return parts, metadata


def _loaded(module: _M, state: dict[str, torch.Tensor]) -> _M:
    prepared: Any = module
    prepared.load_state_dict(state)
    return _frozen(module)


def _trained_vae(
    spec: BuiltinSpec, parts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]
) -> AutoencoderTiny:
    """The trained TAESD from ``_trained_state``'s parts, its scaling factor from the metadata."""
    config = {**spec.taesd, "scaling_factor": float(metadata.get("vae_scaling_factor", 1.0))}
    return _loaded(AutoencoderTiny(**config), parts["vae"])


def _trained_models(name: str, spec: BuiltinSpec, vae: str, prediction_type: str) -> BuiltinModels:
    """``name``'s trained parts (its TAESD and epsilon prediction only: that is what it learned)."""
    if vae != "taesd":
        raise ModelLoadError(f"{BUILTIN_PREFIX}{name} has only its trained TAESD: use vae: taesd.")
    if prediction_type != PredictionType.EPSILON.value:
        raise ModelLoadError(
            f"{BUILTIN_PREFIX}{name} predicts epsilon; prediction_type {prediction_type!r} does not fit it."
        )
    assert spec.weights is not None
    logger.info("loading %s%s (trained weights, %s)", BUILTIN_PREFIX, name, spec.weights.name)
    parts, metadata = _trained_state(name, spec.weights)  # the file is read once for every part
    return BuiltinModels(
        unet=_loaded(UNet2DConditionModel(**spec.unet), parts["unet"]),
        vae=_trained_vae(spec, parts, metadata),
        text_encoder=_loaded(CLIPTextModel(CLIPTextConfig(**spec.text)), parts["text_encoder"]),
        tokenizer=tiny.load_tiny_tokenizer(),
        scheduler_config=tiny.tiny_scheduler_config(prediction_type),
        identity={"model": BUILTIN_PREFIX + name, "weights": trained.file_sha256(spec.weights), "vae": vae},
        family=spec.family,
    )
