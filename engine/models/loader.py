"""Load a Stable Diffusion 1.x / 2.x or SDXL model into a ModelBundle from any supported source."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors import SafetensorError, safe_open

from engine.models.assemble import assemble_bundle, prepare_module, sd_pipeline_parts
from engine.models.builtin import BUILTIN_SPECS, build_builtin_models, build_builtin_vae
from engine.models.bundle import ModelBundle
from engine.models.device import resolve_device, resolve_dtype
from engine.models.errors import ModelLoadError, short_reason
from engine.models.family import TAESD_IDS, detect_family, pipeline_class
from engine.models.kinds import ModelFamily
from engine.models.lora import LoraFactors, fuse_loras
from engine.models.sources import ACCEPTED, SourceKind, builtin_name, classify_source, local_path
from engine.progress import Progress, report

__all__ = ["ModelRequest", "SourceKind", "classify_source", "load_models"]

logger = logging.getLogger(__name__)


VAE_KINDS = ("taesd", "full")
_BASIC_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


def _load_errors() -> tuple[type[BaseException], ...]:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    return (*_BASIC_LOAD_ERRORS, SingleFileComponentError)


def _dtype_kwarg() -> str:
    """diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


_LDM_UNET_PREFIX = "model.diffusion_model."


@dataclass
class ModelRequest:
    """What to load; the field names match the ``model`` section of config.yaml.

    Attributes:
        id: hub id ``org/name``, a diffusers folder, a ``.safetensors``/``.ckpt`` file or
            ``builtin:tiny``.
        vae: ``taesd`` (AutoencoderTiny from ``taesd_id``) or ``full`` (the model's own VAE).
        taesd_id: hub id or local folder of the TAESD weights (None: the family's,
            ``madebyollin/taesd`` for SD, ``madebyollin/taesdxl`` for SDXL).
        lcm_lora: LCM-LoRA to fuse at scale 1.0 (file, folder or hub id), or None.
        loras: ``(source, scale)`` LoRAs to fuse.
        prediction_type: ``auto`` (from the scheduler config), ``epsilon`` or ``v_prediction``.
        device: ``auto``, ``cuda``, ``cuda:N``, ``mps`` or ``cpu``.
        dtype: ``auto``, ``float16``, ``bfloat16`` or ``float32``.
        cache_dir: hub cache folder (None: the hub's default).
        local_files_only: never reach the hub; use only cached or local files.
        single_file_config: a local diffusers folder (or hub id) whose configs describe a
            single-file checkpoint; lets ``.safetensors`` load offline.
        controlnets: ControlNet sources (``engine.models.controlnet``), in config order.
        ip_adapter, ip_image_encoder: the IP-Adapter source and its image encoder
            (``engine.models.ip_adapter``), or None.
    """

    id: str
    vae: str = "taesd"
    taesd_id: str | None = None
    lcm_lora: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    prediction_type: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: str | None = None
    local_files_only: bool = False
    single_file_config: str | None = None
    controlnets: list[str] = field(default_factory=list)
    ip_adapter: str | None = None
    ip_image_encoder: str | None = None

    @classmethod
    def from_config(cls, section: Any) -> ModelRequest:
        """Read a config ``model`` section by attribute name (duck-typed).

        ``section.loras`` items may have ``.path``/``.scale``, be mappings with those keys, or
        be ``(path, scale)`` pairs. Missing attributes take this class's defaults.
        """
        defaults = cls(id="")
        values: dict[str, Any] = {
            name: getattr(section, name, getattr(defaults, name))
            for name in (
                "vae",
                "taesd_id",
                "lcm_lora",
                "prediction_type",
                "device",
                "dtype",
                "cache_dir",
                "local_files_only",
                "single_file_config",
            )
        }
        for name in ("vae", "prediction_type", "device", "dtype"):
            values[name] = str(getattr(values[name], "value", values[name]))
        loras = [_lora_pair(item) for item in getattr(section, "loras", None) or []]
        controlnets = [str(getattr(item, "id", item)) for item in getattr(section, "controlnets", None) or []]
        ip = getattr(section, "ip_adapter", None)
        return cls(
            id=str(section.id),
            loras=loras,
            controlnets=controlnets,
            ip_adapter=None if ip is None else str(ip.id),
            ip_image_encoder=None if ip is None else ip.image_encoder,
            **values,
        )


def _lora_pair(item: Any) -> tuple[str, float]:
    """``(path, scale)`` from an object with ``.path``/``.scale``, a mapping or a pair."""
    if hasattr(item, "path"):
        return str(item.path), float(getattr(item, "scale", 1.0))
    if isinstance(item, dict):
        return str(item["path"]), float(item.get("scale", 1.0))
    path, scale = item
    return str(path), float(scale)


def _stage(progress: Progress | None, line: str, *args: Any) -> None:
    """Log ``line`` at INFO and hand it to ``progress``."""
    report(logger, progress, line % args if args else line)


def _file_facts(path_name: str) -> dict[str, Any]:
    """Size in bytes and mtime of a local file, for cache keys."""
    stat = local_path(path_name).stat()
    return {"size": stat.st_size, "mtime": stat.st_mtime}


def _check_checkpoint(path_name: str) -> None:
    """Fail clearly, before diffusers tries the hub, when a .safetensors is no SD checkpoint."""
    path = local_path(path_name)
    if path.suffix.lower() != ".safetensors":
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys: Iterable[str] = list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(
            f"model file {path_name!r} is not a readable safetensors file: {short_reason(err)}."
        ) from err
    if not any(key.startswith(_LDM_UNET_PREFIX) for key in keys):
        raise ModelLoadError(
            f"model file {path_name!r} is not a Stable Diffusion checkpoint (no "
            f"{_LDM_UNET_PREFIX}* UNet weights); it may be a LoRA or a single component. {ACCEPTED}"
        )


def _load_pipeline(kind: SourceKind, request: ModelRequest, dtype: torch.dtype, family: ModelFamily) -> Any:
    """A ``StableDiffusion(XL)Pipeline`` from a single file, a diffusers folder or the hub."""
    common: dict[str, Any] = {_dtype_kwarg(): dtype}
    if family is ModelFamily.SD:
        common.update(safety_checker=None, requires_safety_checker=False)
    pipeline = pipeline_class(family)
    if kind is SourceKind.SINGLE_FILE:
        _check_checkpoint(request.id)
    try:
        if kind is SourceKind.SINGLE_FILE:
            extra = {"config": request.single_file_config} if request.single_file_config else {}
            return pipeline.from_single_file(
                str(local_path(request.id)),
                local_files_only=request.local_files_only,
                cache_dir=request.cache_dir,
                **extra,
                **common,
            )
        if kind is SourceKind.LOCAL_FOLDER:
            return pipeline.from_pretrained(str(local_path(request.id)), **common)
        return pipeline.from_pretrained(
            request.id,
            cache_dir=request.cache_dir,
            local_files_only=request.local_files_only,
            **common,
        )
    except _load_errors() as err:
        raise ModelLoadError(_pipeline_failure(kind, request.id, err)) from err


def _pipeline_failure(kind: SourceKind, model_id: str, err: BaseException) -> str:
    """The one-or-two-line message for a pipeline that failed to load."""
    reason = short_reason(err)
    if kind is SourceKind.SINGLE_FILE:
        return (
            f"model file {model_id!r} could not be loaded as a Stable Diffusion checkpoint: "
            f"{reason}. Offline, set single_file_config to a local diffusers folder of its family."
        )
    if kind is SourceKind.LOCAL_FOLDER:
        return (
            f"model folder {model_id!r} could not be loaded as a diffusers Stable Diffusion folder "
            f"(unet/, vae/, text_encoder/, tokenizer/, scheduler/): {reason}."
        )
    return (
        f"model {model_id!r} is not a local folder or file and could not be fetched from the hub "
        f"(offline?): {reason}. {ACCEPTED}"
    )


def _taesd_id(request: ModelRequest, family: ModelFamily) -> str:
    return request.taesd_id or TAESD_IDS[family]


def _load_taesd(request: ModelRequest, dtype: torch.dtype, family: ModelFamily) -> AutoencoderTiny:
    """The TAESD ``AutoencoderTiny`` of ``request.taesd_id`` (hub id or local folder; None: the family's)."""
    taesd_id = _taesd_id(request, family)
    folder = local_path(taesd_id)
    source = str(folder) if folder.is_dir() else taesd_id
    try:
        return AutoencoderTiny.from_pretrained(
            source,
            cache_dir=request.cache_dir,
            local_files_only=request.local_files_only,
            **{_dtype_kwarg(): dtype},
        )
    except _load_errors() as err:
        raise ModelLoadError(
            f"TAESD {taesd_id!r} could not be loaded (offline?): {short_reason(err)}. "
            "Give a cached hub id or a local AutoencoderTiny folder as taesd_id, or use vae: full."
        ) from err


def _identity(request: ModelRequest, kind: SourceKind, family: ModelFamily) -> dict[str, Any]:
    """Facts that identify the weights (and the architecture), for engine caches."""
    identity: dict[str, Any] = {
        "model": request.id,
        "family": family.value,
        "vae": request.vae,
        "lcm_lora": request.lcm_lora,
        "loras": [[path, scale] for path, scale in request.loras],
    }
    if request.vae == "taesd" and kind is not SourceKind.BUILTIN:
        identity["taesd_id"] = _taesd_id(request, family)
    if kind is SourceKind.SINGLE_FILE:
        identity.update(_file_facts(request.id))
    return identity


def _fuse_requested(
    pipe: Any, request: ModelRequest, progress: Progress | None, factors: list[LoraFactors]
) -> None:
    """Fuse the request's LCM-LoRA and LoRAs into ``pipe`` (recording their factors)."""
    fuse_loras(
        pipe,
        request.lcm_lora,
        request.loras,
        cache_dir=request.cache_dir,
        local_files_only=request.local_files_only,
        progress=progress,
        factors=factors,
    )


def _load_builtin(
    request: ModelRequest, progress: Progress | None, factors: list[LoraFactors]
) -> dict[str, Any]:
    """A builtin model's parts (LoRAs fused if asked) and its scheduler config."""
    trained = BUILTIN_SPECS[builtin_name(request.id)].weights is not None
    what = "loading %s (trained weights)" if trained else "building %s (random weights)"
    _stage(progress, what, request.id)
    override = request.prediction_type
    built = build_builtin_models(
        builtin_name(request.id),
        seed=0,
        vae=request.vae,
        prediction_type="epsilon" if override == "auto" else override,
    )
    parts: dict[str, Any] = {
        "unet": built.unet,
        "vae": built.vae,
        "text_encoder": built.text_encoder,
        "tokenizer": built.tokenizer,
        "scheduler_config": built.scheduler_config,
        "family": built.family,
        "text_encoder_2": built.text_encoder_2,
        "tokenizer_2": built.tokenizer_2,
    }
    if request.lcm_lora or request.loras:
        pipe = pipeline_class(built.family)(**sd_pipeline_parts(**parts))
        _fuse_requested(pipe, request, progress, factors)
    return parts


def _load_diffusers(
    kind: SourceKind,
    request: ModelRequest,
    device: torch.device,
    dtype: torch.dtype,
    progress: Progress | None,
    factors: list[LoraFactors],
) -> dict[str, Any]:
    """The parts of a single-file, folder or hub model (LoRAs fused, VAE chosen)."""
    family = detect_family(kind, request.id, request.cache_dir, request.local_files_only)
    encoders = "text encoders" if family is ModelFamily.SDXL else "text encoder"
    _stage(progress, "loading %s %s (%s: unet, vae, %s)", kind.value, request.id, family.value, encoders)
    pipe = _load_pipeline(kind, request, dtype, family)
    _stage(progress, "moving model to %s", device)
    pipe.to(device)
    _fuse_requested(pipe, request, progress, factors)
    vae = pipe.vae
    if request.vae == "taesd":
        _stage(progress, "loading TAESD %s", _taesd_id(request, family))
        vae = _load_taesd(request, dtype, family)
    return {
        "unet": pipe.unet,
        "vae": vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler_config": dict(pipe.scheduler.config),
        "family": family,
        "text_encoder_2": getattr(pipe, "text_encoder_2", None),
        "tokenizer_2": getattr(pipe, "tokenizer_2", None),
    }


def load_vae(
    request: ModelRequest | Any, vae: str, device: torch.device, dtype: torch.dtype
) -> AutoencoderTiny | AutoencoderKL:
    """Only the ``vae`` (``taesd`` or ``full``) of the model ``request`` names, on ``device``/``dtype``.

    For the bench's peers, which need the VAE the engine is not configured with: TAESD from
    ``taesd_id``; the full VAE from the model's ``vae`` subfolder (hub id, folder) or from the
    single file; a builtin's own (the same weights ``load_models`` gives it).

    Raises:
        ModelLoadError: unknown ``vae``, or the weights cannot be found or loaded.
    """
    if not isinstance(request, ModelRequest):
        request = ModelRequest.from_config(request)
    if vae not in VAE_KINDS:
        raise ModelLoadError(f"unknown vae {vae!r}: use {' | '.join(VAE_KINDS)}.")
    kind = classify_source(request.id)
    module: Any  # AutoencoderTiny | AutoencoderKL (diffusers' modules are untyped for mypy)
    if kind is SourceKind.BUILTIN:
        module = build_builtin_vae(builtin_name(request.id), 0, vae)
    elif vae == "taesd":
        family = detect_family(kind, request.id, request.cache_dir, request.local_files_only)
        module = _load_taesd(request, dtype, family)
    else:
        try:
            if kind is SourceKind.SINGLE_FILE:
                module = AutoencoderKL.from_single_file(
                    str(local_path(request.id)), local_files_only=request.local_files_only
                )
            else:
                source = str(local_path(request.id)) if kind is SourceKind.LOCAL_FOLDER else request.id
                module = AutoencoderKL.from_pretrained(
                    source,
                    subfolder="vae",
                    cache_dir=request.cache_dir,
                    local_files_only=request.local_files_only,
                )
        except _load_errors() as err:
            reason = short_reason(err)
            raise ModelLoadError(f"the full VAE of {request.id!r} could not be loaded: {reason}") from err
    return prepare_module(module, device, dtype)


def load_models(
    request: ModelRequest | Any,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: Progress | None = None,
) -> ModelBundle:
    """Load the model ``request`` names into a ModelBundle on its device and dtype.

    Args:
        request: a ModelRequest, or a config ``model`` section (read via ``from_config``).
        device: overrides ``request.device`` (a torch device or a name such as ``cuda:0``).
        dtype: overrides ``request.dtype`` (a torch dtype or a name such as ``float16``).
        progress: called with a short line at each stage (``loading TAESD ...``).

    Returns:
        The bundle; every module in eval mode with ``requires_grad`` False, and
        ``alphas_cumprod`` a ``(num_train_timesteps,)`` float32 CPU tensor.

    Raises:
        ModelLoadError: anything that cannot be found or loaded, with a one-or-two-line message.
    """
    if not isinstance(request, ModelRequest):
        request = ModelRequest.from_config(request)
    if request.vae not in VAE_KINDS:
        raise ModelLoadError(f"unknown vae {request.vae!r}: use {' | '.join(VAE_KINDS)}.")
    kind = classify_source(request.id)
    torch_device = device if isinstance(device, torch.device) else resolve_device(device or request.device)
    torch_dtype = (
        dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or request.dtype, torch_device)
    )
    factors: list[LoraFactors] = []
    if kind is SourceKind.BUILTIN:
        parts = _load_builtin(request, progress, factors)
        source = request.id
    else:
        parts = _load_diffusers(kind, request, torch_device, torch_dtype, progress, factors)
        source = f"{kind.value} {request.id}"
    _stage(
        progress,
        "preparing model on %s (%s)",
        torch_device,
        str(torch_dtype).removeprefix("torch."),
    )
    identity = _identity(request, kind, parts["family"])
    if kind is SourceKind.BUILTIN:
        identity["seed"] = 0
    bundle = assemble_bundle(
        prediction_type=request.prediction_type,
        device=torch_device,
        dtype=torch_dtype,
        source=source,
        identity=identity,
        **parts,
    )
    bundle.lora_factors = factors
    bundle.lora_scales = [float(scale) for _, scale in request.loras]
    _load_controlnets(bundle, request, progress)
    if request.ip_adapter is not None:
        _load_ip_adapter(bundle, request, progress)
    return bundle


def _load_ip_adapter(bundle: ModelBundle, request: ModelRequest, progress: Progress | None) -> None:
    """The IP-Adapter, installed on the UNet's attn2 layers (its weights join the UNet's hash)."""
    from engine.models.ip_adapter import install_ip_adapter, load_ip_adapter

    assert request.ip_adapter is not None
    _stage(progress, "loading IP-Adapter %s", request.ip_adapter)
    adapter = load_ip_adapter(
        request.ip_adapter,
        bundle.unet,
        bundle.device,
        bundle.dtype,
        request.ip_image_encoder,
        cache_dir=request.cache_dir,
        local_files_only=request.local_files_only,
    )
    install_ip_adapter(bundle.unet, adapter)
    bundle.ip_adapter = adapter
    bundle.identity["ip_adapter"] = adapter.identity


def _load_controlnets(bundle: ModelBundle, request: ModelRequest, progress: Progress | None) -> None:
    """``request.controlnets`` into ``bundle`` (their identities join the bundle's, for caches)."""
    from engine.models.controlnet import load_controlnet

    identities = []
    for source in request.controlnets:
        _stage(progress, "loading ControlNet %s", source)
        model, identity = load_controlnet(
            source,
            bundle.unet,
            bundle.device,
            bundle.dtype,
            cache_dir=request.cache_dir,
            local_files_only=request.local_files_only,
        )
        bundle.controlnets.append(model)
        identities.append(identity)
    if identities:
        bundle.identity["controlnets"] = identities
