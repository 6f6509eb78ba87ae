"""ONNX export of the UNet and the VAE encoder/decoder with static shapes and the IO names of ``base``.

Every graph has static shapes (the ones of its ``UNetShape`` / ``VaeShape``), the IO names of
``engine.accel.base`` and the float dtype it was exported in (``dtype``: float32, float16 or
bfloat16); only ``timesteps`` is always int64.

UNet (``export_unet``), B = ``shape.batch`` (n, n + 1 or 2n by cfg mode):
    inputs  ``latents``     (B, C, h, w)  float  the noisy stream-batch latents
            ``timesteps``   (B,)          int64  UNet timesteps in [0, num_train_timesteps)
            ``embeddings``  (B, L, D)     float  prompt embeddings laid out for the cfg mode
    output  ``prediction``  (B, C, h, w)  float  ε or v, as the model predicts
    then each registered extension's inputs and outputs (``engine.extensions``; an extension
    may also change the graph's attention, e.g. cross-frame attention bakes its groups in).

VAE encoder (``export_vae_encoder``), f = ``shape.scale_factor``:
    input   ``images``   (1, 3, H, W)         float  in [-1, 1]
    output  ``latents``  (1, C, H/f, W/f)     float  scaled: × ``scaling_factor``
    TAESD: ``vae.encoder`` (maps [-1, 1] → [0, 1] itself); AutoencoderKL: ``encoder`` +
    ``quant_conv``, the mean half of the moments (the distribution's mode). Equals
    ``TorchVae.encode``.

VAE decoder (``export_vae_decoder``):
    input   ``latents``  (1, C, H/f, W/f)     float  scaled latents (÷ ``scaling_factor`` inside)
    output  ``images``   (1, 3, H, W)         float  about [-1, 1], not clamped
    TAESD: ``vae.decoder`` (``tanh(x / 3) · 3``, the layers, then ``· 2 − 1``); AutoencoderKL:
    ``post_quant_conv`` + ``decoder``. Equals ``TorchVae.decode``.

Each file carries metadata properties ``latentstage.*`` (kind, exporter, opset, torch
version, dtype, shape, cross-frame groups or scaling factor); ``export_info`` reads them back
for engine cache keys. Files are written atomically: a crash never leaves a finished-looking
half file. Weights over 1.5 GB go to ``<file>.onnx.data`` next to the graph.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import itertools
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from engine.accel.base import UNET_INPUTS, GraphIO, UNetShape, VaeShape
from engine.extensions.base import GraphPart
from engine.models.conditioned import ConditionedUNet

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install latentstage[onnx]"
OPSETS = (18, 19, 20)
"""Opsets we export: the dynamo exporter's own is 18; TensorRT 10.0 parses ≤ 20."""
EXPORTERS = ("auto", "dynamo", "torchscript")
EXTERNAL_DATA_BYTES = 1536 * 1024 * 1024
"""Weights above this go to external data (protobuf's limit is 2 GB; torch uses the same 1.5 GB)."""
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_META = "latentstage."


class OnnxUnavailableError(RuntimeError):
    """A package of the ``onnx`` extra is missing; the message names ``pip install latentstage[onnx]``."""


class OnnxExportError(RuntimeError):
    """The export ran but the graph is not what the shape asked for (nothing was written)."""


def require(module: str) -> ModuleType:
    """Import ``module`` (``onnx``, ``onnxruntime``, ``onnxscript``) or raise ``OnnxUnavailableError``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise OnnxUnavailableError(
            f"{module} is not installed; ONNX export and ONNX Runtime need `{INSTALL_HINT}` ({err})"
        ) from err


@dataclass(frozen=True)
class ExportInfo:
    """What ``export_*`` recorded in a file (for engine cache keys).

    Attributes:
        kind: ``unet``, ``vae_encoder`` or ``vae_decoder``.
        exporter: ``dynamo`` or ``torchscript`` (the one that actually wrote the graph).
        opset: the default-domain opset of the graph.
        torch_version: ``torch.__version__`` at export.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        extra: the other ``latentstage.*`` properties (shape, cross-frame groups, scaling).
    """

    kind: str
    exporter: str
    opset: int
    torch_version: str
    dtype: str
    extra: dict[str, str] = field(default_factory=dict)


def export_info(path: str | os.PathLike[str]) -> ExportInfo:
    """Read the ``latentstage.*`` properties and the opset of an exported graph (weights not loaded)."""
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key[len(_META) :]: p.value for p in model.metadata_props if p.key.startswith(_META)}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    known = {k: props.pop(k, "") for k in ("kind", "exporter", "torch", "dtype")}
    props.pop("opset", None)
    return ExportInfo(
        kind=known["kind"],
        exporter=known["exporter"],
        opset=int(opset),
        torch_version=known["torch"],
        dtype=known["dtype"],
        extra=props,
    )


# ---------------------------------------------------------------------- graph wrappers
class _TinyPart(nn.Module):
    """TAESD ``encoder`` (its input mapping included) × scaling factor, or ÷ scaling factor then
    TAESD ``decoder`` (soft clamp, layers, [0, 1] → [-1, 1])."""

    def __init__(self, part: nn.Module, scaling_factor: float, *, encoder: bool) -> None:
        super().__init__()
        self.is_encoder = encoder
        self.part_name = "encoder" if encoder else "decoder"
        self.add_module(self.part_name, part)  # initializers keep their encoder.* / decoder.* names
        self.scaling_factor = scaling_factor

    def forward(self, x: torch.Tensor) -> Any:
        part = getattr(self, self.part_name)
        if self.is_encoder:
            return part(x) * self.scaling_factor
        return part(x / self.scaling_factor)


class _KLEncoder(nn.Module):
    """AutoencoderKL ``encoder`` + ``quant_conv``; the mean (mode) half × scaling factor."""

    def __init__(self, vae: Any, scaling_factor: float) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling_factor = scaling_factor

    def forward(self, images: torch.Tensor) -> Any:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.latent_channels] * self.scaling_factor


class _KLDecoder(nn.Module):
    """÷ scaling factor, AutoencoderKL ``post_quant_conv`` + ``decoder``."""

    def __init__(self, vae: Any, scaling_factor: float) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.scaling_factor = scaling_factor

    def forward(self, latents: torch.Tensor) -> Any:
        z = latents / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ---------------------------------------------------------------------- public exports
def export_unet(
    unet: Any,
    shape: UNetShape,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    opset: int = 18,
    *,
    exporter: str = "auto",
    parts: Sequence[GraphPart] | None = None,
) -> Path:
    """Export a diffusers ``UNet2DConditionModel`` for one static ``shape``; see the module doc.

    The graph is the UNet with its extensions' parts in one (``ConditionedUNet``): its inputs and
    outputs are ``shape.io`` (each registered extension's, ``engine.extensions``), so a live
    scale or strength is an input and never re-exports. ``parts``: the extensions' modules for
    ``shape`` (``graph_parts(shape, models)``); None: the ones the shape alone makes (an
    extension with weights of its own must be given).

    The caller's UNet is never changed: the export runs on a CPU copy in ``dtype`` that each
    extension prepares for ``shape`` (cross-frame attention's processors, the feature bank's).

    Args:
        unet: the UNet (any device and dtype).
        shape: batch, latent and text shapes, and what the extensions add.
        path: the ``.onnx`` file to write (its folder is created).
        dtype: float dtype of the graph's weights and float IO.
        opset: 18, 19 or 20.
        exporter: ``auto`` (dynamo, TorchScript only where dynamo cannot export), ``dynamo`` or
            ``torchscript``; ``export_info(path).exporter`` says which one wrote the file.

    Returns:
        ``path``.

    Raises:
        ValueError: the shape does not fit the UNet or the parts, or a bad dtype/opset/exporter.
        OnnxUnavailableError: ``onnx`` is not installed.
    """
    from engine.extensions import graph_parts, registered

    _check_options(dtype, opset, exporter)
    config = unet.config
    _check_unet_shape(config, shape)
    parts = graph_parts(shape) if parts is None else list(parts)
    io = shape.io
    taken = [name for part in parts for name in part.inputs]
    if taken != list(io.inputs)[len(UNET_INPUTS) :]:
        raise ValueError(f"{shape!r} takes {list(io.inputs)}; the given parts take {taken}")
    for part in parts:
        part.check(shape)
    model = _export_copy(unet, dtype)
    example = torch.Generator("cpu").manual_seed(0)
    timestep_count = int(getattr(config, "num_train_timesteps", 1000) or 1000)
    args: list[torch.Tensor] = [
        torch.randn(shape.latents, generator=example).to(dtype),
        torch.randint(0, timestep_count, (shape.batch,), generator=example, dtype=torch.int64),
        torch.randn(shape.embeddings, generator=example).to(dtype),
    ]
    for extension in registered():
        extension.prepare_export(model, shape)
        if extension.graph_io(shape).inputs:
            args += extension.example_inputs(shape, example, dtype)
    metadata = {
        "shape": repr(asdict(shape)),
        "cross_frame_groups": repr(shape.cross_frame_groups),
    }
    return _export(
        ConditionedUNet(model, [_export_copy(part, dtype) for part in parts]),
        tuple(args),
        Path(path),
        kind="unet",
        io=io,
        dtype=dtype,
        opset=opset,
        exporter=exporter,
        metadata=metadata,
    )


def export_vae(
    vae: Any,
    shape: VaeShape,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    scaling_factor: float | None = None,
    *,
    encoder: bool,
    opset: int = 18,
    exporter: str = "auto",
) -> Path:
    """Export the encoder (``images (1, 3, H, W) in [-1, 1] -> scaled latents``; equals
    ``TorchVae.encode``) or, with ``encoder=False``, the decoder (``scaled latents -> images``
    in about [-1, 1]; equals ``TorchVae.decode``) of ``vae``.

    ``scaling_factor`` defaults to ``vae.config.scaling_factor`` (pass the bundle's
    ``vae_scaling_factor``). Other arguments, return and errors as ``export_unet``.
    """
    _check_options(dtype, opset, exporter)
    _check_latent_channels(vae, shape)
    scale = _scaling(vae, scaling_factor)
    model = _export_copy(vae, dtype)
    generator = torch.Generator("cpu").manual_seed(0)
    module: nn.Module
    if encoder:
        module = _TinyPart(model.encoder, scale, encoder=True) if _is_tiny(vae) else _KLEncoder(model, scale)
        io = shape.encoder_io
        example = torch.rand(shape.image, generator=generator) * 2 - 1
    else:
        module = _TinyPart(model.decoder, scale, encoder=False) if _is_tiny(vae) else _KLDecoder(model, scale)
        io = shape.decoder_io
        example = torch.randn(shape.latent, generator=generator)
    return _export(
        module,
        (example.to(dtype),),
        Path(path),
        kind="vae_encoder" if encoder else "vae_decoder",
        io=io,
        dtype=dtype,
        opset=opset,
        exporter=exporter,
        metadata={"shape": repr(asdict(shape)), "scaling_factor": repr(scale)},
    )


export_vae_encoder = functools.partial(export_vae, encoder=True)
export_vae_decoder = functools.partial(export_vae, encoder=False)


# ---------------------------------------------------------------------- internals
def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    kind: str,
    io: GraphIO,
    dtype: torch.dtype,
    opset: int,
    exporter: str,
    metadata: Mapping[str, str],
) -> Path:
    """Export ``module(*args)`` to ``path`` atomically, check its IO, record how it was made."""
    _check_options(dtype, opset, exporter)
    onnx = require("onnx")
    if exporter == "auto" and importlib.util.find_spec("onnxscript") is None:
        logger.warning("onnxscript is not installed: using the TorchScript exporter (%s)", INSTALL_HINT)
        exporter = "torchscript"
    elif exporter == "dynamo":
        require("onnxscript")
    module.eval()
    weight_bytes = sum(
        t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers())
    )
    large = weight_bytes > EXTERNAL_DATA_BYTES
    props = {
        "kind": kind,
        "opset": str(opset),
        "torch": torch.__version__,
        "dtype": _DTYPES[dtype],
        **metadata,
    }
    input_names, output_names = list(io.inputs), list(io.outputs)
    started = time.perf_counter()
    used = exporter

    def write(staged: Path) -> None:
        nonlocal used
        if exporter in ("auto", "dynamo"):
            try:
                program = _dynamo_export(module, args, input_names, output_names, opset)
            except torch.onnx.errors.OnnxExporterError as err:
                if exporter == "dynamo":
                    raise
                logger.warning(
                    "the dynamo ONNX exporter cannot export the %s (%s: %s); "
                    "falling back to the TorchScript exporter",
                    kind,
                    type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "",
                )
            else:
                used = "dynamo"
                program.model.metadata_props.update({_META + k: v for k, v in props.items()})
                program.model.metadata_props[_META + "exporter"] = used
                program.save(str(staged), external_data=large)
                return
        used = "torchscript"
        raw = staged.parent / "raw" / staged.name
        raw.parent.mkdir()
        _torchscript_export(module, args, raw, input_names, output_names, opset)
        proto = onnx.load(str(raw))
        onnx.helper.set_model_props(proto, {_META + k: v for k, v in {**props, "exporter": used}.items()})
        onnx.save_model(
            proto,
            str(staged),
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            location=staged.name + ".data",
        )
        shutil.rmtree(raw.parent)

    expected = {**io.inputs, **io.outputs}
    _write_atomically(path, write, lambda staged: _check_graph(onnx, staged, expected, kind))
    logger.info(
        "exported the %s to %s with the %s exporter (opset %d, %s) in %.1f s",
        kind,
        path,
        used,
        opset,
        _DTYPES[dtype],
        time.perf_counter() - started,
    )
    return path


def _dynamo_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> Any:
    """``torch.onnx.export(dynamo=True)`` without saving; returns the ``ONNXProgram``."""
    return _torch_export(module, args, None, input_names, output_names, opset, dynamo=True)


def _torchscript_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> None:
    """The deprecated TorchScript exporter (the fallback); static shapes, constants folded."""
    _torch_export(module, args, str(path), input_names, output_names, opset, dynamo=False)


def _torch_export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    target: str | None,
    input_names: list[str],
    output_names: list[str],
    opset: int,
    *,
    dynamo: bool,
) -> Any:
    """``torch.onnx.export`` without gradients and with the exporter's own noise silenced."""
    options: dict[str, Any]
    with torch.no_grad(), warnings.catch_warnings():
        if dynamo:
            # torch's own exporter trips its own pytree deprecation; nothing the caller can act on
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            options = {"optimize": True, "verbose": False}
        else:
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            options = {"do_constant_folding": True}
        return torch.onnx.export(
            module,
            args,
            target,
            dynamo=dynamo,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            **options,
        )


def _write_atomically(path: Path, write: Callable[[Path], None], check: Callable[[Path], None]) -> None:
    """Write into a temporary folder next to ``path``, check, then move into place; ``.onnx`` last.

    The old ``path`` is removed before its companions (external data) are replaced, so a
    crash at any point leaves either no ``path`` or a complete, checked one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = staging / path.name
        write(staged)
        check(staged)
        path.unlink(missing_ok=True)
        for companion in staging.iterdir():
            if companion != staged and companion.is_file():
                os.replace(companion, path.parent / companion.name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_graph(onnx: ModuleType, path: Path, expected: Mapping[str, tuple[int, ...]], kind: str) -> None:
    """Every IO name is present with exactly the static shape it should have."""
    graph = onnx.load(str(path), load_external_data=False).graph
    actual: dict[str, tuple[int | str, ...]] = {}
    for value in itertools.chain(graph.input, graph.output):
        dims = value.type.tensor_type.shape.dim
        actual[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims
        )
    wanted = {name: tuple(dims) for name, dims in expected.items()}
    if actual != wanted:
        raise OnnxExportError(f"the exported {kind} graph has IO {actual}; expected {wanted}")


def _check_options(dtype: torch.dtype, opset: int, exporter: str) -> None:
    """Refuse bad options, and a missing ``onnx``, before any copying or tracing."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} is not exportable; use one of {list(_DTYPES.values())}")
    if opset not in OPSETS:
        raise ValueError(f"opset {opset} is not supported; use one of {OPSETS}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is unknown; use one of {EXPORTERS}")
    require("onnx")


def _export_copy(module: Any, dtype: torch.dtype) -> Any:
    """A deep copy on the CPU in ``dtype`` (floating tensors only), without a second device copy."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        target = dtype if tensor.is_floating_point() else tensor.dtype
        cast = tensor.detach().to(device="cpu", dtype=target, copy=True)
        memo[id(tensor)] = (
            nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast
        )
    model = copy.deepcopy(module, memo)
    model.eval()
    return model


def _check_unet_shape(config: Any, shape: UNetShape) -> None:
    """The shape fits the UNet config (latent channels, text width, a batch)."""
    facts = {
        "latent_channels": getattr(config, "in_channels", shape.latent_channels),
        "text_dim": getattr(config, "cross_attention_dim", shape.text_dim),
    }
    for name, value in facts.items():
        if isinstance(value, int) and getattr(shape, name) != value:
            raise ValueError(f"{shape!r} has {name}={getattr(shape, name)} but the UNet has {value}")
    if shape.batch < 1:
        raise ValueError(f"{shape!r}: batch must be at least 1")


def _check_latent_channels(vae: Any, shape: VaeShape) -> None:
    channels = getattr(vae.config, "latent_channels", shape.latent_channels)
    if channels != shape.latent_channels:
        raise ValueError(f"{shape!r} has latent_channels={shape.latent_channels} but the VAE has {channels}")


def _is_tiny(vae: Any) -> bool:
    """AutoencoderTiny (TAESD) or else AutoencoderKL-like."""
    from diffusers import AutoencoderTiny

    return isinstance(vae, AutoencoderTiny)


def _scaling(vae: Any, scaling_factor: float | None) -> float:
    if scaling_factor is not None:
        return float(scaling_factor)
    return float(getattr(vae.config, "scaling_factor", 1.0))


def initializer_map(
    path: str | os.PathLike[str], module: nn.Module, names: Iterable[str], prefix: str = "unet."
) -> dict[str, tuple[str, bool]]:
    """Where each torch parameter of ``names`` lives in an exported graph (for TensorRT refits).

    The dynamo exporter keeps ``prefix + name`` for most initializers, but folds the transpose of
    a ``Linear`` weight into an anonymous constant (``val_115`` = ``W.T``); those are found by
    value: the one initializer equal to ``W.T`` (in the graph's dtype).

    Returns:
        ``{torch name: (initializer name, transposed)}``.

    Raises:
        KeyError: a name is not found, or found more than once (ambiguous by value).
    """
    onnx = require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    arrays = {init.name: init for init in model.graph.initializer}
    params = dict(module.named_parameters())
    result: dict[str, tuple[str, bool]] = {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for init_name, init in arrays.items():
        by_shape.setdefault(tuple(init.dims), []).append(init_name)
    for name in names:
        if prefix + name in arrays:
            result[name] = (prefix + name, False)
            continue
        weight = params[name].detach().cpu()
        if weight.dim() != 2:
            raise KeyError(f"{name}: no initializer {prefix + name!r} in {path}")
        wanted = weight.T.contiguous()
        hits = []
        for candidate in by_shape.get(tuple(wanted.shape), []):
            value = torch.from_numpy(numpy_helper.to_array(arrays[candidate]).copy())
            if torch.equal(value, wanted.to(value.dtype)):
                hits.append(candidate)
        if len(hits) != 1:
            raise KeyError(f"{name}: {len(hits)} initializers of {path} equal its transpose")
        result[name] = (hits[0], True)
    return result
