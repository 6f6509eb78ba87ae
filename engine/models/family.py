"""Which architecture family a model source holds (SD or SDXL), read before its weights are loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from engine.models.errors import ModelLoadError
from engine.models.kinds import ModelFamily
from engine.models.sources import SourceKind, local_path

logger = logging.getLogger(__name__)

TAESD_IDS = {ModelFamily.SD: "madebyollin/taesd", ModelFamily.SDXL: "madebyollin/taesdxl"}
_SD_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "LatentConsistencyModelPipeline")
_SDXL_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
_SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."  # the second text encoder of an SDXL checkpoint


def family_of_class(class_name: str, model_id: str) -> ModelFamily:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``).

    Raises:
        ModelLoadError: a pipeline of another family (SD3, Flux, an SDXL refiner ...).
    """
    if class_name in _SD_CLASSES:
        return ModelFamily.SD
    if class_name in _SDXL_CLASSES:
        return ModelFamily.SDXL
    raise ModelLoadError(
        f"model {model_id!r} is a {class_name}; supported: SD 1.x / 2.x ({', '.join(_SD_CLASSES)}) "
        f"and SDXL ({', '.join(_SDXL_CLASSES)})"
    )


def detect_family(
    kind: SourceKind, model_id: str, cache_dir: str | None, local_files_only: bool
) -> ModelFamily:
    """SD or SDXL, from a folder's or hub repo's ``model_index.json`` or a single file's keys.

    Where that cannot be read (a hub repo offline and not cached) the answer is SD, and the
    loader's own error names what is missing.
    """
    if kind is SourceKind.SINGLE_FILE:
        return _single_file_family(local_path(model_id))
    index = _model_index(kind, model_id, cache_dir, local_files_only)
    if index is None:
        return ModelFamily.SD
    return family_of_class(str(index.get("_class_name", "")), model_id)


def _model_index(
    kind: SourceKind, model_id: str, cache_dir: str | None, local_files_only: bool
) -> dict[str, Any] | None:
    if kind is SourceKind.LOCAL_FOLDER:
        path: Path | None = local_path(model_id) / "model_index.json"
    else:
        path = _hub_index(model_id, cache_dir, local_files_only)
    if path is None or not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model {model_id!r} has an unreadable model_index.json: {err}") from err
    return loaded if isinstance(loaded, dict) else None


def _hub_index(model_id: str, cache_dir: str | None, local_files_only: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(
            hf_hub_download(
                model_id, "model_index.json", cache_dir=cache_dir, local_files_only=local_files_only
            )
        )
    except (OSError, ValueError, HFValidationError) as err:  # offline, not cached, no such repo
        logger.debug("no model_index.json for %s: %s", model_id, err)
        return None


def _single_file_family(path: Path) -> ModelFamily:
    if path.suffix.lower() != ".safetensors":
        return ModelFamily.SD
    try:
        with safe_open(str(path), framework="pt") as handle:
            sdxl = any(key.startswith(_SDXL_SINGLE_FILE_KEY) for key in handle.keys())  # noqa: SIM118
    except (SafetensorError, OSError):
        return ModelFamily.SD  # the loader's checkpoint check reports the file
    return ModelFamily.SDXL if sdxl else ModelFamily.SD


def pipeline_class(family: ModelFamily) -> Any:
    """diffusers' text-to-image pipeline class of ``family`` (imported on first use: seconds)."""
    if family is ModelFamily.SDXL:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline
