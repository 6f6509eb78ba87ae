"""The engine cache: keys naming everything that changes a built engine, folders, manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import re
import shutil
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.atomicfile import atomic_write_bytes as atomic_write_bytes  # re-exported for the builders
from engine.atomicfile import atomic_write_text

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae_encoder", "vae_decoder")
PRECISIONS = ("fp16", "bf16", "fp32")
KEY_FORMAT = 1
"""Bumped when the meaning of a key field changes; part of every digest."""
MANIFEST_NAME = "manifest.json"
MAX_FOLDER_NAME = 80
_MAX_MODEL_SLUG = 32
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".onnx", ".plan", ".engine")
_RESERVED_WINDOWS = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- names
def windows_safe_name(name: str, max_length: int = MAX_FOLDER_NAME) -> str:
    """``name`` as a file/folder name valid on Windows, macOS and Linux.

    Only ``[A-Za-z0-9._-]``; no leading/trailing dot, space or dash; at most ``max_length``
    characters; never a reserved device name (``CON``, ``nul.txt``, ``com1`` ...): those get a
    leading underscore. An empty result becomes ``_``.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    safe = _UNSAFE.sub("-", ascii_name)
    safe = re.sub(r"-{2,}", "-", safe).strip(" .-")[:max_length].rstrip(" .-")
    if not safe:
        return "_"
    if safe.split(".")[0].upper() in _RESERVED_WINDOWS:
        safe = ("_" + safe)[:max_length].rstrip(" .-")
    return safe


def model_slug(model_id: str, max_length: int = _MAX_MODEL_SLUG) -> str:
    """A short readable name for a model id: its last path component, without a weights suffix.

    ``stabilityai/sd-turbo`` → ``sd-turbo``; ``C:\\models\\My Model!.safetensors`` →
    ``my-model``; ``builtin:tiny`` → ``builtin-tiny``. Lower case, ``[a-z0-9.-]`` only.
    """
    text = model_id.strip().replace("\\", "/").rstrip("/")
    last = text.rsplit("/", 1)[-1]
    for suffix in _WEIGHT_SUFFIXES:
        if last.lower().endswith(suffix) and len(last) > len(suffix):
            last = last[: -len(suffix)]
            break
    slug = windows_safe_name(last.replace("_", "-"), max_length=max_length).lower().lstrip("_")
    slug = slug.replace("_", "-").strip(".-")
    return slug or "model"


def canonical_json(value: Any) -> str:
    """Stable JSON text: sorted keys, no spaces, ASCII only; tuples become lists."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def canonical_identity(identity: Mapping[str, Any]) -> str:
    """``ModelBundle.identity`` (model id, vae, LCM-LoRA, LoRAs with scales, file facts) as key text.

    Dict ordering does not matter; list ordering (the LoRA fuse order) does.
    """
    return canonical_json(dict(identity))


def current_os() -> str:
    """The operating system an engine is built on (``windows``, ``linux``, ``darwin``)."""
    return platform.system().lower() or "unknown"


def _value(item: Any) -> str:
    """An enum's value or the item itself, as text (``CfgType.SELF`` → ``self``)."""
    return str(getattr(item, "value", item))


# --------------------------------------------------------------------------- weights hash
def weights_fingerprint(module: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over every tensor of a module's ``state_dict`` (or a state dict), in name order.

    Each tensor contributes its name, dtype, shape and raw bytes (native byte order, which is
    little-endian on every platform the engine runs on), so any change of one element, of a
    dtype or of a name changes the hash. Every byte is hashed: about 1-2 GB/s on one core plus
    the device-to-host copy, so a 1.7 GB fp16 SD UNet takes a few seconds. That is paid once
    per ``latentstage build`` / cache lookup, never per frame.
    """
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}|object|{tensor!r};".encode())
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)};".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- key
@dataclass(frozen=True)
class EngineKey:
    """Everything that changes a built engine; equal keys may share one engine, others never.

    Attributes:
        component: ``unet``, ``vae_encoder`` or ``vae_decoder``.
        model: canonical JSON of ``ModelBundle.identity`` (incl. fused LCM-LoRA/LoRAs and scales).
        weights_hash: ``weights_fingerprint`` of the exported module (what was really fused).
        height, width: image resolution in pixels.
        batch: the engine's static batch (UNet: n, n + 1 or 2n by cfg mode; VAE: 1).
        cfg_mode: ``none``, ``self``, ``onetime`` or ``full``.
        cross_frame: cross-frame attention baked into the graph.
        precision: ``fp16``, ``bf16`` or ``fp32`` (the ONNX's weights/activations).
        io_dtypes: ``((io name, dtype), ...)`` sorted by name.
        opset: ONNX opset of the export.
        exporter: exporter name and version (e.g. ``torch.onnx-dynamo 2.15.0``).
        tensorrt_version: ``tensorrt.__version__``.
        gpu_name, compute_capability: from ``torch.cuda`` (``sm89``).
        os: ``current_os()``.
        refittable: built with ``BuilderFlag.REFIT``.
    """

    component: str
    model: str
    weights_hash: str
    height: int
    width: int
    batch: int
    cfg_mode: str
    cross_frame: bool
    precision: str
    io_dtypes: tuple[tuple[str, str], ...]
    opset: int
    exporter: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    os: str
    refittable: bool

    def __post_init__(self) -> None:
        if self.component not in COMPONENTS:
            raise ValueError(f"component {self.component!r}: allowed {' | '.join(COMPONENTS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: allowed {' | '.join(PRECISIONS)}")
        if self.height <= 0 or self.width <= 0 or self.batch <= 0:
            raise ValueError(
                f"height, width and batch must be positive: {self.height, self.width, self.batch}"
            )

    @classmethod
    def create(
        cls,
        *,
        component: str,
        identity: Mapping[str, Any],
        weights_hash: str,
        height: int,
        width: int,
        batch: int,
        precision: str,
        io_dtypes: Mapping[str, Any] | Iterable[tuple[str, Any]],
        opset: int,
        exporter: str,
        tensorrt_version: str,
        gpu_name: str,
        compute_capability: str,
        cfg_mode: Any = "none",
        cross_frame: bool = False,
        os_name: str | None = None,
        refittable: bool = False,
    ) -> EngineKey:
        """A key from loose inputs: identity dict, enum cfg mode, dtype objects, io dtype mapping."""
        pairs = io_dtypes.items() if isinstance(io_dtypes, Mapping) else io_dtypes
        return cls(
            component=component,
            model=canonical_identity(identity),
            weights_hash=weights_hash,
            height=int(height),
            width=int(width),
            batch=int(batch),
            cfg_mode=_value(cfg_mode),
            cross_frame=bool(cross_frame),
            precision=precision,
            io_dtypes=tuple(sorted((str(name), str(dtype).replace("torch.", "")) for name, dtype in pairs)),
            opset=int(opset),
            exporter=exporter,
            tensorrt_version=str(tensorrt_version),
            gpu_name=gpu_name,
            compute_capability=compute_capability,
            os=os_name if os_name is not None else current_os(),
            refittable=bool(refittable),
        )

    def as_dict(self) -> dict[str, Any]:
        """Every field (tuples as lists), as written into the manifest."""
        return json.loads(canonical_json(dataclasses.asdict(self)))

    def digest(self) -> str:
        """sha256 hex over a canonical JSON of every field (and the key format)."""
        payload = canonical_json({"key_format": KEY_FORMAT, **self.as_dict()})
        return hashlib.sha256(payload.encode("ascii")).hexdigest()

    @property
    def model_id(self) -> str:
        """The model id inside ``model`` (``model`` / ``model_id`` / ``id`` of the identity)."""
        try:
            identity = json.loads(self.model)
        except json.JSONDecodeError:
            return self.model
        if isinstance(identity, dict):
            for name in ("model", "model_id", "id"):
                if isinstance(identity.get(name), str):
                    return str(identity[name])
        return "model"

    def folder_name(self) -> str:
        """A readable folder name, valid on Windows.

        E.g. ``unet_sd-turbo_512x512_b2_self_xfa0_fp16_trt10.13_sm89_1a2b3c4d``.
        At most 80 characters of ``[A-Za-z0-9._-]``; the last part is the digest's first 8 hex
        digits (``lookup`` still checks the whole digest in the manifest).
        """
        trt_parts = re.findall(r"\d+", self.tensorrt_version)[:2]
        trt = ".".join(trt_parts) if trt_parts else self.tensorrt_version
        head = [self.component]
        tail = [f"{self.width}x{self.height}", f"b{self.batch}"]  # WxH, as /resolution
        if self.component == "unet":
            if self.cfg_mode != f"b{self.batch}":  # the runtime keys by batch alone: say it once
                tail.append(self.cfg_mode)
            tail.append(f"xfa{int(self.cross_frame)}")
        tail += [self.precision, f"trt{trt}", self.compute_capability]
        if self.refittable:
            tail.append("refit")
        tail = [windows_safe_name(part.replace("_", "-"), 16).strip("_") or "x" for part in tail]
        hash8 = self.digest()[:8]
        fixed = len("_".join([*head, *tail, hash8])) + 1
        slug = model_slug(self.model_id, max_length=max(4, min(_MAX_MODEL_SLUG, MAX_FOLDER_NAME - fixed)))
        name = "_".join([*head, slug, *tail])
        name = name[: MAX_FOLDER_NAME - len(hash8) - 1].rstrip(" .-_")
        return windows_safe_name(f"{name}_{hash8}")

    def timing_cache_name(self) -> str:
        """File name of the timing cache shared by engines of one TensorRT version and GPU."""
        gpu = model_slug(self.gpu_name, max_length=24)
        return windows_safe_name(f"timing_trt{self.tensorrt_version}_{self.compute_capability}_{gpu}.cache")


# --------------------------------------------------------------------------- cache
@dataclass(frozen=True)
class CacheEntry:
    """One folder of the cache: its manifest (None when missing/unreadable) and whether it is usable."""

    path: Path
    manifest: dict[str, Any] | None
    complete: bool


class EngineCache:
    """A folder of engine folders, one per ``EngineKey``, each with a ``manifest.json``.

    A folder counts only when its manifest (written last, atomically) carries the key's digest
    and every file it lists exists with the recorded size: a half-built folder is never used.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, key: EngineKey) -> Path:
        """The folder of ``key`` (may not exist yet)."""
        return self.root / key.folder_name()

    def manifest_path(self, key: EngineKey) -> Path:
        return self.path_for(key) / MANIFEST_NAME

    def file_path(self, key: EngineKey, name: str) -> Path:
        """Where a file of ``key``'s folder lives (``name`` a plain file name)."""
        return self.path_for(key) / _plain_name(name)

    def timing_cache_path(self, key: EngineKey) -> Path:
        """The timing cache for ``key``'s TensorRT version and GPU (shared by its engines)."""
        return self.root / key.timing_cache_name()

    def write_manifest(
        self,
        key: EngineKey,
        files: Mapping[str, str | Path],
        extra: Mapping[str, Any] | None = None,
        build_seconds: float | None = None,
    ) -> Path:
        """Record a finished build: call it last, after every file of ``files`` is written.

        Args:
            key: the key the folder was built for.
            files: role → file name in the folder (``{"plan": "unet.plan"}``); sizes are read now.
            extra: anything else worth keeping (ONNX path, tool versions, timings).
            build_seconds: how long the build took.
        """
        folder = self.path_for(key)
        listed: dict[str, dict[str, Any]] = {}
        for role, name in files.items():
            file_name = _plain_name(Path(name).name if isinstance(name, Path) else name)
            if isinstance(name, Path) and name.is_absolute() and name.parent.resolve() != folder.resolve():
                raise ValueError(f"{name} is not inside the engine folder {folder}")
            target = folder / file_name
            if not target.is_file():
                raise FileNotFoundError(f"{target} does not exist: write the files before the manifest")
            listed[str(role)] = {"name": file_name, "size": target.stat().st_size}
        now = time.time()
        manifest = {
            "format": KEY_FORMAT,
            "digest": key.digest(),
            "folder": folder.name,
            "key": key.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
            "created_unix": now,
            "build_seconds": build_seconds,
            "files": listed,
            "extra": dict(extra or {}),
        }
        return atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, default=str) + "\n")

    def read_manifest(self, key_or_folder: EngineKey | Path) -> dict[str, Any] | None:
        """The manifest of a key's folder (or of any folder); None when missing or unreadable."""
        folder = self.path_for(key_or_folder) if isinstance(key_or_folder, EngineKey) else key_or_folder
        try:
            manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            logger.debug("no readable manifest in %s: %s", folder, err)
            return None
        return manifest if isinstance(manifest, dict) else None

    def lookup(self, key: EngineKey) -> Path | None:
        """The folder of a finished build for ``key``, or None (missing, half-built, stale)."""
        folder = self.path_for(key)
        if not folder.is_dir():
            return None
        manifest = self.read_manifest(folder)
        if manifest is None:
            logger.info("engine folder %s has no manifest (unfinished build?): ignored", folder)
            return None
        if manifest.get("digest") != key.digest():
            logger.info("engine folder %s was built for another key: ignored", folder)
            return None
        return folder if _files_complete(folder, manifest) else None

    def entries(self) -> list[CacheEntry]:
        """Every engine folder under the root, sorted by name, complete or not."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            manifest = self.read_manifest(folder)
            complete = (
                manifest is not None
                and manifest.get("folder") == folder.name
                and _files_complete(folder, manifest)
            )
            found.append(CacheEntry(folder, manifest, complete))
        return found

    def remove(self, key: EngineKey) -> bool:
        """Delete ``key``'s folder (e.g. before a rebuild); True when there was one."""
        folder = self.path_for(key)
        if not folder.is_dir():
            return False
        shutil.rmtree(folder)
        return True

    def describe(self, keys: Iterable[EngineKey]) -> str:
        """Lines for ``latentstage build``: the cache root, then per key ready/missing and where."""
        lines = [f"engine cache: {self.root.resolve()}"]
        for key in keys:
            folder = self.lookup(key)
            if folder is None:
                lines.append(f"  {key.component:<12} to build  {self.path_for(key)}")
                continue
            manifest = self.read_manifest(folder) or {}
            size = sum(int(f.get("size", 0)) for f in manifest.get("files", {}).values())
            seconds = manifest.get("build_seconds")
            took = f", built in {float(seconds):.0f} s" if isinstance(seconds, (int, float)) else ""
            lines.append(
                f"  {key.component:<12} ready     {folder}  "
                f"({_human_size(size)}, {manifest.get('created', '?')}{took})"
            )
        return "\n".join(lines)


def _plain_name(name: str) -> str:
    """Refuse anything but a plain file name (no folders, no ``..``)."""
    if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise ValueError(f"{name!r} is not a plain file name")
    return name


def _files_complete(folder: Path, manifest: Mapping[str, Any]) -> bool:
    """Every file the manifest lists exists with its recorded size (and there is at least one)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for role, entry in files.items():
        try:
            path = folder / _plain_name(str(entry["name"]))
            if path.stat().st_size != int(entry["size"]):
                logger.info("engine file %s has the wrong size: folder ignored", path)
                return False
        except (OSError, KeyError, TypeError, ValueError) as err:
            logger.info(
                "engine file %r of %s is missing or unreadable (%s): folder ignored", role, folder, err
            )
            return False
    return True


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
