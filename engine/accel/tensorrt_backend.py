"""TensorRT backend: static strongly typed engines from fp16 ONNX, preallocated IO runners, LoRA refit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.accel.base import (
    PREDICTION,
    UNET_INPUTS,
    VAE_IMAGES,
    VAE_LATENTS,
    Conditioning,
    UNetShape,
    VaeShape,
    unet_feeds,
)
from engine.accel.cache import atomic_write_bytes

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install latentstage[tensorrt] (Windows/Linux with an NVIDIA GPU) together with a CUDA build "
    "of torch (https://pytorch.org/get-started/locally/)"
)
DEFAULT_WORKSPACE_BYTES = 4 << 30
Component = Literal["unet", "vae_encoder", "vae_decoder"]
ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
ProgressReport = Callable[[str, int, int], None]
LoraList = Iterable[Sequence[Any]]


class TensorRTUnavailableError(RuntimeError):
    """TensorRT, CUDA or a CUDA build of torch is missing; the message names what to install."""


class EngineBuildError(RuntimeError):
    """An engine could not be built (ONNX parser errors, builder failure, cancel)."""


class BuildCancelledError(EngineBuildError):
    """The build was cancelled through the progress monitor."""


class EngineLoadError(RuntimeError):
    """A plan file could not be deserialized (other TensorRT version or GPU?)."""


class EngineRefitError(RuntimeError):
    """Refitting weights failed: unknown, missing or mismatched weights."""


# --------------------------------------------------------------------------- availability
def _import_tensorrt() -> Any:
    import tensorrt  # lazy by design: the engine must import without TensorRT

    return tensorrt


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (every missing piece, and what to install), or None."""
    problems = []
    try:
        _import_tensorrt()
    except (ImportError, OSError) as err:
        problems.append(f"TensorRT is not installed ({err})")
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not built with CUDA")
    elif not torch.cuda.is_available():
        problems.append("CUDA is not available (no NVIDIA GPU or driver found)")
    if not problems:
        return None
    return "; ".join(problems) + f". Install: {INSTALL_HINT}."


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or TensorRTUnavailableError naming what to install."""
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailableError(reason)
    return _import_tensorrt()


def tensorrt_version() -> str | None:
    """``tensorrt.__version__``, or None when it is not importable."""
    try:
        return str(_import_tensorrt().__version__)
    except (ImportError, OSError):
        return None


def gpu_facts(device: torch.device | int | None = None) -> tuple[str, str]:
    """``(GPU name, "smXY")`` of a CUDA device (the current one by default), for cache keys."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(f"CUDA is not available: no GPU facts. Install: {INSTALL_HINT}.")
    index = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"sm{major}{minor}"


def fallback_decision(
    requested_backend: Any, fallback: Any, reason: str | None
) -> tuple[Literal["use", "fallback", "error"], str]:
    """What to do when a backend is asked for: use it, fall back to torch, or stop.

    Args:
        requested_backend: ``tensorrt``, ``onnxruntime``, ``torch`` (str or enum).
        fallback: ``error`` or ``torch`` (str or enum), from ``acceleration.fallback``.
        reason: ``unavailable_reason()`` of the backend (None: it can run).

    Returns:
        ``(decision, message)``; the message names the missing piece and what to do.
    """
    backend = str(getattr(requested_backend, "value", requested_backend))
    mode = str(getattr(fallback, "value", fallback))
    if mode not in ("error", "torch"):
        raise ValueError(f"fallback {mode!r}: allowed error | torch")
    if reason is None or backend == "torch":
        return "use", f"using the {backend} backend"
    if mode == "torch":
        return "fallback", f"the {backend} backend cannot run: {reason} Running on torch instead (slower)."
    return "error", (
        f"the {backend} backend cannot run: {reason} "
        "Or set acceleration.fallback: torch to run on torch instead."
    )


# --------------------------------------------------------------------------- pure helpers
def static_shapes(shape: UNetShape | VaeShape, component: str) -> dict[str, tuple[int, ...]]:
    """Input name → static shape of one component (the UNet's timesteps are ``(batch,)``)."""
    if component == "unet":
        if not isinstance(shape, UNetShape):
            raise TypeError(f"the unet needs a UNetShape, got {type(shape).__name__}")
        return dict(shape.io.inputs)
    if not isinstance(shape, VaeShape):
        raise TypeError(f"{component} needs a VaeShape, got {type(shape).__name__}")
    if component == "vae_encoder":
        return dict(shape.encoder_io.inputs)
    if component == "vae_decoder":
        return dict(shape.decoder_io.inputs)
    raise ValueError(f"component {component!r}: allowed unet | vae_encoder | vae_decoder")


def static_profile(shape: UNetShape | VaeShape, component: str) -> dict[str, ShapeTriple]:
    """Optimization profile of a static engine: input name → ``(min, opt, max)``, all equal."""
    return {name: (dims, dims, dims) for name, dims in static_shapes(shape, component).items()}


_DTYPE_PAIRS = (
    ("FLOAT", torch.float32),
    ("HALF", torch.float16),
    ("BF16", torch.bfloat16),
    ("INT32", torch.int32),
    ("INT64", torch.int64),
    ("BOOL", torch.bool),
    ("INT8", torch.int8),
    ("UINT8", torch.uint8),
)


def _dtype_pairs(trt: Any) -> list[tuple[Any, torch.dtype]]:
    """``(trt.DataType member, torch dtype)`` for the members this TensorRT has."""
    pairs = []
    for name, torch_dtype in _DTYPE_PAIRS:
        member = getattr(trt.DataType, name, None)
        if member is not None:
            pairs.append((member, torch_dtype))
    return pairs


def trt_dtype_to_torch(trt_dtype: Any, trt: Any) -> torch.dtype:
    """The torch dtype of a ``trt.DataType``; TypeError for ones torch cannot hold (FP8, INT4)."""
    for member, torch_dtype in _dtype_pairs(trt):
        if member == trt_dtype:
            return torch_dtype
    raise TypeError(f"TensorRT dtype {trt_dtype} has no torch equivalent here")


def torch_to_trt(dtype: torch.dtype, trt: Any) -> Any:
    """The ``trt.DataType`` of a torch dtype; TypeError for unsupported ones (float64 ...)."""
    for member, torch_dtype in _dtype_pairs(trt):
        if torch_dtype == dtype:
            return member
    raise TypeError(f"torch dtype {dtype} has no TensorRT equivalent")


def network_flags(trt: Any) -> int:
    """``create_network`` flags: STRONGLY_TYPED where the enum has it, EXPLICIT_BATCH only where it exists.

    10.x has both (EXPLICIT_BATCH deprecated, harmless); 11 dropped EXPLICIT_BATCH and types every
    network strongly. The precision comes from the fp16 ONNX; no FP16 builder flag is ever set.
    """
    kinds = trt.NetworkDefinitionCreationFlag
    flags = 0
    for name in ("EXPLICIT_BATCH", "STRONGLY_TYPED"):
        member = getattr(kinds, name, None)
        if member is not None:
            flags |= 1 << int(member)
    return flags


def builder_config(
    trt: Any,
    builder: Any,
    workspace_bytes: int,
    timing_cache_bytes: bytes,
    refittable: bool,
    progress: Any = None,
) -> Any:
    """A builder config: WORKSPACE pool limit, timing cache, REFIT when asked, progress monitor.

    A timing cache from another TensorRT/GPU that does not load is replaced by an empty one.
    No precision flags: the network is strongly typed (11 removed BuilderFlag.FP16).
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache = config.create_timing_cache(bytes(timing_cache_bytes))
    if cache is None or not config.set_timing_cache(cache, False):
        logger.warning("the timing cache does not match this TensorRT/GPU: starting an empty one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if progress is not None:
        config.progress_monitor = progress
    return config


def make_progress_monitor(trt: Any, report: ProgressReport, cancel: threading.Event | None = None) -> Any:
    """A ``trt.IProgressMonitor`` that reports ``(phase, steps done, total)`` and can cancel.

    Nested phases are reported with their parents' names (``Building > Tactic selection``);
    a total of 0 means unknown. ``step_complete`` returns False (cancel the build) once
    ``cancel`` is set. ``report`` runs on the building thread and must not raise. Returns None
    when this TensorRT has no IProgressMonitor.
    """
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        logger.info("this TensorRT has no IProgressMonitor: building without progress")
        return None

    class BuildProgress(base):  # type: ignore[misc, valid-type]
        """Reports nested TensorRT build phases to ``report``."""

        def __init__(self) -> None:
            super().__init__()  # pybind11 bases must be initialised explicitly
            self.phases: dict[str, tuple[str | None, int]] = {}

        def label(self, name: str) -> str:
            parts = [name]
            parent = self.phases.get(name, (None, 0))[0]
            while parent is not None and parent in self.phases and len(parts) < 16:
                parts.append(parent)
                parent = self.phases[parent][0]
            return " > ".join(reversed(parts))

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            total = max(int(num_steps), 0)
            self.phases[phase_name] = (parent_phase, total)
            report(self.label(phase_name), 0, total)

        def step_complete(self, phase_name: str, step: int) -> bool:
            total = self.phases.get(phase_name, (None, 0))[1]
            done = int(step) + 1  # TensorRT counts steps from zero
            report(self.label(phase_name), min(done, total) if total else done, total)
            return not (cancel is not None and cancel.is_set())

        def phase_finish(self, phase_name: str) -> None:
            label = self.label(phase_name)
            total = self.phases.pop(phase_name, (None, 0))[1]
            report(label, total, total)

    return BuildProgress()


class TqdmProgress:
    """A ``report`` for ``make_progress_monitor`` drawing one tqdm bar per active phase."""

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self.kwargs = tqdm_kwargs
        self.bars: dict[str, Any] = {}

    def __call__(self, phase: str, step: int, total: int) -> None:
        from tqdm import tqdm  # only the CLI draws bars

        bar = self.bars.get(phase)
        if bar is None:
            bar = tqdm(
                total=total or None, desc=phase, position=phase.count(" > "), leave=False, **self.kwargs
            )
            self.bars[phase] = bar
        bar.update(max(0, step - bar.n))
        if total and step >= total:
            bar.close()
            del self.bars[phase]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def default_workspace_bytes() -> int:
    """Free GPU memory less 1 GiB for activations (at least 1 GiB); 4 GiB without CUDA."""
    if not torch.cuda.is_available():
        return DEFAULT_WORKSPACE_BYTES
    free, _total = torch.cuda.mem_get_info()
    return max(1 << 30, int(free) - (1 << 30))


# --------------------------------------------------------------------------- build
def build_engine(
    onnx_path: Path,
    shape: UNetShape | VaeShape,
    component: str,
    out_path: Path,
    timing_cache: Path,
    refittable: bool = False,
    progress: ProgressReport | None = None,
    *,
    cancel: threading.Event | None = None,
    workspace_bytes: int | None = None,
    trt_module: Any = None,
) -> Path:
    """Build a static, strongly typed engine from an (fp16) ONNX file and write its plan.

    The ONNX's precision is the engine's; every input (timesteps too) gets min = opt = max.
    The timing cache is read from ``timing_cache`` when it exists and written back after a
    successful build; the plan is written atomically to ``out_path``.

    Args:
        onnx_path: the exported graph (external ``.onnx.data`` next to it is resolved).
        shape, component: fix the profile (``static_profile``).
        out_path: where the plan goes.
        timing_cache: timing cache file for this TensorRT version and GPU.
        refittable: set ``BuilderFlag.REFIT`` (LoRA refits; slower engine).
        progress: ``(phase, step, total)`` callback (see ``make_progress_monitor``).
        cancel: set it from another thread to cancel the build.
        workspace_bytes: WORKSPACE pool limit (default: free GPU memory less 1 GiB).
        trt_module: the ``tensorrt`` module (tests pass a stand-in).

    Raises:
        EngineBuildError: parser errors (all of them), mismatched input names, builder failure.
        BuildCancelledError: ``cancel`` was set.
        TensorRTUnavailableError: TensorRT or CUDA is missing.
    """
    trt = trt_module if trt_module is not None else require_tensorrt()
    onnx_path, out_path, timing_cache = Path(onnx_path), Path(out_path), Path(timing_cache)
    if not onnx_path.is_file():
        raise EngineBuildError(f"ONNX file {onnx_path} does not exist: export it first")
    profile_shapes = static_profile(shape, component)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(
            f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):\n  " + "\n  ".join(errors)
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(profile_shapes):
        raise EngineBuildError(
            f"{onnx_path} has inputs {inputs}; a {component} engine needs exactly {list(profile_shapes)}"
        )
    monitor = make_progress_monitor(trt, progress or (lambda *_: None), cancel)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    workspace = default_workspace_bytes() if workspace_bytes is None else int(workspace_bytes)
    config = builder_config(trt, builder, workspace, cache_bytes, refittable, monitor)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        if cancel is not None and cancel.is_set():
            raise BuildCancelledError(f"the {component} engine build was cancelled")
        raise EngineBuildError(
            f"build_serialized_network returned None for {onnx_path} (see the TensorRT log above; "
            "out of GPU memory or an unsupported layer?)"
        )
    atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
    atomic_write_bytes(out_path, memoryview(plan))
    logger.info("built %s engine %s in %.0f s", component, out_path, time.perf_counter() - started)
    return out_path


# --------------------------------------------------------------------------- run
@dataclass(frozen=True)
class TensorSpec:
    """One IO tensor of an engine: name, direction, torch dtype, shape (-1 where dynamic)."""

    name: str
    is_input: bool
    dtype: torch.dtype
    shape: tuple[int, ...]


def tensor_specs(engine: Any, trt: Any) -> list[TensorSpec]:
    """The IO tensors of a deserialized engine (name-based API); dynamic input dims → profile opt."""
    specs = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if is_input and any(d < 0 for d in shape):
            shape = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[1])
        specs.append(
            TensorSpec(name, is_input, trt_dtype_to_torch(engine.get_tensor_dtype(name), trt), shape)
        )
    return specs


class TrtRunner:
    """One engine with its IO buffers allocated once on the GPU and bound by name.

    ``run`` copies the inputs into the bound buffers on the runner's own stream, enqueues
    ``execute_async_v3`` there (or replays a CUDA graph of it) and makes the caller's stream wait;
    nothing synchronizes the host. Outputs are the bound buffers, valid until the next ``run``,
    unless ``copy_outputs`` (then fresh tensors on the caller's stream).
    """

    def __init__(
        self,
        plan: Path | bytes,
        *,
        device: torch.device | int | None = None,
        use_cuda_graph: bool = False,
        copy_outputs: bool = False,
        trt_module: Any = None,
    ) -> None:
        trt = trt_module if trt_module is not None else require_tensorrt()
        self._trt = trt
        if isinstance(device, torch.device):
            self.device = device
        else:
            self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        data = Path(plan).read_bytes() if isinstance(plan, (str, Path)) else plan
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(data)
            if self.engine is None:
                raise EngineLoadError(
                    "TensorRT could not load the engine (built by another TensorRT version or for "
                    "another GPU?): rebuild it with `latentstage build`"
                )
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        self.specs = tensor_specs(self.engine, trt)
        self.input_names = tuple(s.name for s in self.specs if s.is_input)
        self.output_names = tuple(s.name for s in self.specs if not s.is_input)
        self.buffers: dict[str, torch.Tensor] = {}
        for spec in self.specs:
            if spec.is_input and not self.context.set_input_shape(spec.name, spec.shape):
                raise EngineLoadError(
                    f"the engine refused input {spec.name!r} of shape {spec.shape}: rebuild it with "
                    "`latentstage build`"
                )
        for spec in self.specs:
            shape = spec.shape if spec.is_input else tuple(self.context.get_tensor_shape(spec.name))
            buffer = torch.empty(shape, dtype=spec.dtype, device=self.device)
            self.buffers[spec.name] = buffer
            self.context.set_tensor_address(spec.name, buffer.data_ptr())
        self.use_cuda_graph = use_cuda_graph
        self.copy_outputs = copy_outputs
        self._graph: Any = None
        self._warm = False

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One inference; ``inputs`` by name with the engine's shapes (dtype/device cast on copy)."""
        if inputs.keys() != set(self.input_names):
            raise KeyError(f"inputs {sorted(inputs)}; this engine takes {sorted(self.input_names)}")
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            for name, tensor in inputs.items():
                buffer = self.buffers[name]
                if tensor.shape != buffer.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, engine has {tuple(buffer.shape)}")
                buffer.copy_(tensor, non_blocking=True)
            if self._graph is None and self.use_cuda_graph and self._warm:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
            elif not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            self._warm = True
        caller.wait_stream(self.stream)
        outputs = {name: self.buffers[name] for name in self.output_names}
        return {k: v.clone() for k, v in outputs.items()} if self.copy_outputs else outputs

    def _capture(self) -> None:
        """Capture ``execute_async_v3`` on the runner's stream into a CUDA graph (after one warm run).

        Thread-local capture mode: CUDA calls of other threads (sinks, bridges) cannot break it.
        """
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                enqueued = self.context.execute_async_v3(self.stream.cuda_stream)
        except RuntimeError as err:
            logger.warning("CUDA graph capture failed (%s): running without a graph", err)
            self.use_cuda_graph = False
            return
        if not enqueued:  # an empty graph would replay nothing and leave the outputs stale
            logger.warning("TensorRT did not enqueue inside the CUDA graph capture: running without a graph")
            self.use_cuda_graph = False
            return
        self._graph = graph

    def close(self) -> None:
        """Free the context, the engine and the IO buffers (GPU memory) now; safe twice."""
        if getattr(self, "engine", None) is None:
            return
        self.stream.synchronize()  # nothing of ours may still read the buffers
        self._graph = None
        self.buffers.clear()
        self.context = None
        self.engine = None

    def invalidate_graph(self) -> None:
        """Forget the captured graph; the next ``run`` captures again (after buffers move, a refit)."""
        self._graph = None

    def refit(self, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Refit named weights (ONNX initializer names) of a refittable engine; re-captures the graph.

        Waits for this runner's work first: not for the per-frame path.
        """
        self.stream.synchronize()
        refit_lora(self.engine, weights, self._trt, logger=self._logger)
        self.invalidate_graph()


def check_unet_io(input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """A UNet engine's IO: the core inputs, whole input groups of registered extensions, and
    ``prediction`` plus exactly those extensions' outputs (``engine.extensions``).

    Raises:
        EngineLoadError: naming what the engine has and what a UNet engine has.
    """
    from engine.extensions import registered

    present = [e for e in registered() if set(e.inputs) & set(input_names)]
    inputs = {*UNET_INPUTS, *(name for e in present for name in e.inputs)}  # whole groups only
    outputs = {PREDICTION, *(name for e in present for name in e.outputs)}
    if set(input_names) != inputs or set(output_names) != outputs:
        optional = sorted(name for e in registered() for name in e.inputs)
        raise EngineLoadError(
            f"not a UNet engine: inputs {tuple(input_names)}, outputs {tuple(output_names)}; "
            f"expected {UNET_INPUTS} (+ {optional}) → {sorted(outputs)}"
        )


class TrtUNet(TrtRunner):
    """``UNetRunner`` over a UNet engine with inputs ``latents, timesteps, embeddings`` and its
    extensions' (``UNetShape.io``)."""

    def __init__(self, plan: Path | bytes, **kwargs: Any) -> None:
        kwargs.setdefault("copy_outputs", True)
        super().__init__(plan, **kwargs)
        check_unet_io(self.input_names, self.output_names)

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        feeds = unet_feeds(self.input_names, latents, timesteps, embeddings, conditioning)
        outputs = self.run(feeds)
        if conditioning is not None:
            for name, tensor in outputs.items():
                if name != PREDICTION:
                    conditioning.give(name, tensor)
        return outputs[PREDICTION]


class TrtVae:
    """``VaeRunner`` over an encoder and a decoder engine from ``engine.accel.onnx_export``.

    Those graphs already scale (encoder: × scaling factor; decoder: ÷ inside), so they equal
    ``TorchVae.encode``/``decode`` and nothing is scaled here.
    """

    def __init__(self, encoder: TrtRunner, decoder: TrtRunner) -> None:
        for runner, ins, outs, what in (
            (encoder, (VAE_IMAGES,), (VAE_LATENTS,), "encoder"),
            (decoder, (VAE_LATENTS,), (VAE_IMAGES,), "decoder"),
        ):
            if runner.input_names != ins or runner.output_names != outs:
                raise EngineLoadError(
                    f"not a VAE {what} engine: {runner.input_names} → {runner.output_names}; "
                    f"expected {ins} → {outs}"
                )
        self.encoder, self.decoder = encoder, decoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.run({VAE_IMAGES: images})[VAE_LATENTS]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.run({VAE_LATENTS: latents})[VAE_IMAGES]

    def close(self) -> None:
        """Free both engines; safe twice."""
        self.encoder.close()
        self.decoder.close()

    @classmethod
    def from_plans(cls, encoder: Path | bytes, decoder: Path | bytes, **kwargs: Any) -> TrtVae:
        """Both runners from plan files (``TrtRunner`` keyword arguments; outputs copied by default)."""
        kwargs.setdefault("copy_outputs", True)
        return cls(TrtRunner(encoder, **kwargs), TrtRunner(decoder, **kwargs))


# --------------------------------------------------------------------------- LoRA
def _lora_set(loras: LoraList | None) -> tuple[tuple[str, float], ...]:
    """LoRAs as a sorted tuple of ``(source, scale)``; scale-0 entries fuse to nothing and drop."""
    return tuple(sorted((str(entry[0]), float(entry[1])) for entry in loras or () if float(entry[1]) != 0.0))


def lora_change_plan(
    engine_refittable: bool, old_loras: LoraList | None, new_loras: LoraList | None
) -> Literal["none", "refit", "rebuild"]:
    """What a LoRA change costs an engine with fused LoRAs.

    Same set and scales (order and scale-0 entries aside) → ``none``; otherwise ``refit`` when the
    engine was built refittable (refit every weight either set touches: ``refit_payload``), else
    ``rebuild`` (tell the user: this engine was not built refittable, a rebuild is needed).
    """
    if _lora_set(old_loras) == _lora_set(new_loras):
        return "none"
    return "refit" if engine_refittable else "rebuild"


def refit_payload(
    base_weights: Mapping[str, Any], new_weights: Mapping[str, Any], old_touched: Iterable[str]
) -> dict[str, Any]:
    """The weights to refit when going from one fused LoRA set to another.

    Every weight the new set changes gets its new value; every weight only the old set changed
    goes back to the base value, or A→B→A would leave blends of A and B behind.
    """
    payload = dict(new_weights)
    missing = []
    for name in old_touched:
        if name in payload:
            continue
        if name not in base_weights:
            missing.append(name)
            continue
        payload[name] = base_weights[name]
    if missing:
        raise EngineRefitError(
            f"no base value for {len(missing)} weight(s) the old LoRAs changed: {missing[:8]}"
        )
    return payload


def refit_lora(
    engine: Any, new_weights: Mapping[str, np.ndarray | torch.Tensor], trt: Any, logger: Any = None
) -> None:
    """Refit a REFIT-built engine with named weights (ONNX initializer names).

    CUDA tensors are passed as ``TensorLocation.DEVICE``, CPU tensors and numpy arrays as HOST;
    each is cast to the dtype of the engine's weight (``get_weights_prototype``, TensorRT 10+)
    and must have its element count.

    Raises:
        EngineRefitError: unknown names, weights TensorRT needs but did not get
            (``get_missing_weights``), a rejected weight or a failed refit.
    """
    refitter = trt.Refitter(engine, logger if logger is not None else trt.Logger(trt.Logger.WARNING))
    known = set(refitter.get_all_weights())
    unknown = sorted(name for name in new_weights if name not in known)
    if unknown:
        raise EngineRefitError(
            f"{len(unknown)} weight(s) are not refittable in this engine: {unknown[:8]} "
            "(not built refittable, or names other than the ONNX initializers?)"
        )
    alive = []
    any_cuda = False
    prototype = getattr(refitter, "get_weights_prototype", None)
    for name, value in new_weights.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        tensor = tensor.detach()
        if prototype is not None:
            expected = prototype(name)
            if int(expected.size) != tensor.numel():
                raise EngineRefitError(
                    f"weight {name!r} has {tensor.numel()} values; the engine's has {int(expected.size)}"
                )
            tensor = tensor.to(trt_dtype_to_torch(expected.dtype, trt))
        tensor = tensor.contiguous()
        alive.append(tensor)
        any_cuda = any_cuda or tensor.is_cuda
        weights = trt.Weights(torch_to_trt(tensor.dtype, trt), tensor.data_ptr(), tensor.numel())
        location = trt.TensorLocation.DEVICE if tensor.is_cuda else trt.TensorLocation.HOST
        if not refitter.set_named_weights(name, weights, location):
            raise EngineRefitError(
                f"TensorRT rejected weight {name!r} ({tensor.dtype}, {tuple(tensor.shape)})"
            )
    missing = sorted(refitter.get_missing_weights())
    if missing:
        raise EngineRefitError(
            f"the refit also needs {len(missing)} weight(s) that were not given: {missing[:8]}"
        )
    if any_cuda:
        torch.cuda.synchronize()  # the new weights must be written before TensorRT reads them
    if not refitter.refit_cuda_engine():
        raise EngineRefitError("refit_cuda_engine failed (see the TensorRT log)")
    alive.clear()  # the tensors had to outlive the refit: TensorRT read them by pointer
