"""Backend selection: torch, ONNX Runtime or TensorRT runners for the pipeline, with fallback."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from engine.accel.base import UNetRunner, UNetShape, VaeRunner, VaeShape
from engine.accel.cache import EngineCache, EngineKey, weights_fingerprint
from engine.accel.kinds import BackendKind
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.extensions import graph_parts
from engine.extensions import identity as extension_identity
from engine.models.bundle import ModelBundle
from engine.models.conditioned import ConditionedUNet
from engine.models.lora import rescale_bundle, rescaled_unet_weights
from engine.params import ParamError
from engine.progress import Progress, report

logger = logging.getLogger(__name__)

Shape = TypeVar("Shape", UNetShape, VaeShape)
Runner = TypeVar("Runner", UNetRunner, VaeRunner)


class BackendUnavailableError(RuntimeError):
    """The configured backend cannot run here and ``acceleration.fallback`` is ``error``."""


class Backend(Protocol):
    """Gives the pipeline its UNet and VAE runners, and owns them.

    ``unet_for`` / ``vae_for`` answer at once (a ready runner or ``None``); ``prepare_unet`` /
    ``prepare_vae`` may export or build for minutes and are called off the frame loop when a
    live change needs a new shape (batch or resolution); ``cancel`` asks a running build of
    those shapes to stop. ``retain`` closes the runners of every other shape (their GPU memory),
    keeping what is on disk. ``set_lora_scales`` moves the weights to new LoRA scales (or
    refuses with ``ParamError``, changing nothing). ``close`` releases everything; safe twice.
    """

    name: str

    def unet_for(self, shape: UNetShape) -> UNetRunner | None: ...

    def prepare_unet(self, shape: UNetShape, progress: Progress | None = None) -> UNetRunner: ...

    def vae_for(self, shape: VaeShape) -> VaeRunner | None: ...

    def prepare_vae(self, shape: VaeShape, progress: Progress | None = None) -> VaeRunner: ...

    def cancel(self, shapes: Collection[UNetShape | VaeShape]) -> None: ...

    def retain(self, unet_shapes: Collection[UNetShape], vae_shapes: Collection[VaeShape]) -> None: ...

    def set_lora_scales(self, old: Sequence[float], new: Sequence[float]) -> None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def close_runner(runner: object) -> None:
    """Release a runner's memory now (ONNX Runtime sessions, TensorRT engines); torch has nothing."""
    close = getattr(runner, "close", None)
    if close is not None:
        close()


@dataclass
class AccelSettings:
    """The ``acceleration`` config section (plain values)."""

    backend: BackendKind = BackendKind.TORCH
    fallback: str = "error"
    compile: bool = False
    engine_dir: str = "engines"
    onnx_providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    cuda_graph: bool = False
    refittable: bool = False

    @classmethod
    def from_config(cls, section: Any) -> AccelSettings:
        return cls(
            backend=BackendKind(getattr(section.backend, "value", section.backend)),
            fallback=str(getattr(section.fallback, "value", section.fallback)),
            compile=bool(section.compile),
            engine_dir=str(section.engine_dir),
            onnx_providers=list(section.onnx_providers),
            cuda_graph=bool(section.cuda_graph),
            refittable=bool(section.refittable),
        )


class TorchBackend:
    """Eager PyTorch, optionally ``torch.compile``, optionally replaying CUDA graphs.

    ``compile_unet`` compiles the UNet (inductor, static shapes: a new batch or size compiles
    again on its first frame). ``cuda_graph`` on a CUDA device compiles with
    ``mode="reduce-overhead"``, which records each shape's UNet call into a CUDA graph and
    replays it; off CUDA it is ignored with one warning. ``compile_backend`` is torch.compile's
    backend (``inductor``; ``aot_eager`` traces without generating code, for quick checks).
    """

    name = "torch"

    def __init__(
        self,
        models: ModelBundle,
        compile_unet: bool = False,
        cuda_graph: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        unet = models.unet
        if cuda_graph and models.device.type != "cuda":
            logger.warning("acceleration.cuda_graph needs CUDA; the UNet on %s runs without", models.device)
            cuda_graph = False
        self.mode = "cuda graphs" if cuda_graph else "compile" if compile_unet else "eager"
        if cuda_graph or compile_unet:
            logger.info("compiling the UNet with torch.compile (%s; first frames are slow)", self.mode)
            mode = "reduce-overhead" if cuda_graph else None
            unet = torch.compile(unet, mode=mode, dynamic=False, backend=compile_backend)
        self.models = models
        self._unet = TorchUNet.of(models, unet, replays_graphs=cuda_graph)
        self._vae = TorchVae(models.vae, models.vae_scaling_factor)

    def unet_for(self, shape: UNetShape) -> UNetRunner:
        return self._unet

    def prepare_unet(self, shape: UNetShape, progress: Progress | None = None) -> UNetRunner:
        return self._unet

    def vae_for(self, shape: VaeShape) -> VaeRunner:
        return self._vae

    def prepare_vae(self, shape: VaeShape, progress: Progress | None = None) -> VaeRunner:
        return self._vae

    def cancel(self, shapes: Collection[UNetShape | VaeShape]) -> None:
        return None  # nothing is ever built

    def retain(self, unet_shapes: Collection[UNetShape], vae_shapes: Collection[VaeShape]) -> None:
        return None  # one module serves every shape

    def set_lora_scales(self, old: Sequence[float], new: Sequence[float]) -> None:
        """Rescale the fused LoRAs of the torch modules in place (the runner calls them)."""
        rescale_bundle(self.models, old, new)

    def describe(self) -> str:
        return f"torch ({self.mode})"

    def close(self) -> None:
        return None  # the modules belong to the ModelBundle


class _ExportedBackend:
    """Shared by ONNX Runtime and TensorRT: exported graphs in the engine cache, by key."""

    name = "exported"

    def __init__(self, models: ModelBundle, vae_shape: VaeShape, settings: AccelSettings) -> None:
        self.models = models
        self.vae_shape = vae_shape
        self.settings = settings
        self.cache = EngineCache(Path(settings.engine_dir))
        self._runners: dict[UNetShape, UNetRunner] = {}
        self._vaes: dict[VaeShape, VaeRunner] = {}
        self._lock = threading.Lock()
        self._flights: dict[UNetShape | VaeShape, threading.Lock] = {}  # one load per shape at a time
        self._cancels: dict[UNetShape | VaeShape, threading.Event] = {}  # of the loads running now
        self._fingerprints: dict[str, str] = {}
        self._refit_names: dict[UNetShape, dict[str, tuple[str, bool]]] = {}
        self._closed = False

    # ------------------------------------------------------------------ protocol
    def unet_for(self, shape: UNetShape) -> UNetRunner | None:
        with self._lock:
            return self._runners.get(shape)

    def prepare_unet(self, shape: UNetShape, progress: Progress | None = None) -> UNetRunner:
        return self._prepare(shape, self._runners, lambda: self._load_unet(shape, progress))

    def _prepare(self, shape: Shape, loaded: dict[Shape, Runner], load: Callable[[], Runner]) -> Runner:
        """The runner of ``shape`` from ``loaded``, else ``load()``ed once (on the models' GPU)."""
        with self._flight(shape):
            with self._lock:
                runner = loaded.get(shape)
                if self._closed:
                    raise RuntimeError(f"the {self.name} backend is closed")
                if runner is None:
                    self._cancels[shape] = threading.Event()
            if runner is None:
                try:
                    with self._on_model_device():
                        runner = load()
                finally:
                    with self._lock:
                        self._cancels.pop(shape, None)
                with self._lock:
                    loaded[shape] = runner
            return runner

    def _cancel_event(self, shape: UNetShape | VaeShape) -> threading.Event | None:
        """Set when the build of ``shape`` running now should stop (``cancel``, ``close``)."""
        with self._lock:
            return self._cancels.get(shape)

    def cancel(self, shapes: Collection[UNetShape | VaeShape]) -> None:
        """Ask the running builds of ``shapes`` to stop (TensorRT stops at its next step)."""
        with self._lock:
            for shape in shapes:
                event = self._cancels.get(shape)
                if event is not None:
                    event.set()

    def close(self) -> None:
        """Cancel running builds and close every loaded runner; safe twice."""
        with self._lock:
            self._closed = True
            for event in self._cancels.values():
                event.set()
            runners: list[object] = [*self._runners.values(), *self._vaes.values()]
            self._runners.clear()
            self._vaes.clear()
            self._refit_names.clear()
        for runner in runners:
            close_runner(runner)

    @property
    def busy(self) -> bool:
        """True while an export / build runs (a LoRA refit must wait: it would miss that engine)."""
        with self._lock:
            return any(lock.locked() for lock in self._flights.values())

    @contextlib.contextmanager
    def _flight(self, shape: UNetShape | VaeShape) -> Iterator[None]:
        """Serialise loads of one shape: a second caller waits and then finds it loaded."""
        with self._lock:
            lock = self._flights.setdefault(shape, threading.Lock())
        with lock:
            yield

    def _on_model_device(self) -> contextlib.AbstractContextManager[Any]:
        """Runners made on a build thread belong on the models' GPU, not on device 0."""
        device = self.models.device
        if device.type == "cuda":
            return torch.cuda.device(device)
        return contextlib.nullcontext()

    def vae_for(self, shape: VaeShape) -> VaeRunner | None:
        with self._lock:
            return self._vaes.get(shape)

    def prepare_vae(self, shape: VaeShape, progress: Progress | None = None) -> VaeRunner:
        return self._prepare(shape, self._vaes, lambda: self._load_vae(shape, progress))

    def retain(self, unet_shapes: Collection[UNetShape], vae_shapes: Collection[VaeShape]) -> None:
        """Close the loaded runners of every other shape (engines stay cached on disk)."""
        with self._lock:
            dropped = [s for s in self._runners if s not in unet_shapes]
            dropped_vaes = [s for s in self._vaes if s not in vae_shapes]
            closing: list[object] = [self._runners.pop(shape) for shape in dropped]
            closing += [self._vaes.pop(shape) for shape in dropped_vaes]
            for shape in dropped:
                self._refit_names.pop(shape, None)
        for runner in closing:
            close_runner(runner)
        if dropped or dropped_vaes:
            logger.info(
                "released %d UNet and %d VAE runners of sizes no longer in use",
                len(dropped),
                len(dropped_vaes),
            )

    def unet_keys(self, shapes: Sequence[UNetShape]) -> list[EngineKey]:
        return [self._key("unet", shape) for shape in shapes]

    def vae_keys(self, shape: VaeShape | None = None) -> list[EngineKey]:
        shape = shape or self.vae_shape
        return [self._key(component, shape) for component in ("vae_encoder", "vae_decoder")]

    # ------------------------------------------------------------------ to implement
    def _load_unet(self, shape: UNetShape, progress: Progress | None) -> UNetRunner:
        raise NotImplementedError

    def _load_vae(self, shape: VaeShape, progress: Progress | None) -> VaeRunner:
        raise NotImplementedError

    def _runtime_fields(self) -> dict[str, str]:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def export_dtype(self) -> torch.dtype:
        """fp16 graphs where the device is CUDA (TensorRT builds strongly typed from them)."""
        return torch.float16 if self.models.device.type == "cuda" else torch.float32

    def _dtype_of(self, component: str) -> torch.dtype:
        """The graph dtype of ``component``: a VAE kept in float32 (SDXL's, which overflows in
        float16) is exported in float32 too."""
        if component != "unet" and next(self.models.vae.parameters()).dtype == torch.float32:
            return torch.float32
        return self.export_dtype

    def _fingerprint(self, component: str) -> str:
        if component not in self._fingerprints:
            module: torch.nn.Module = self.models.vae
            if component == "unet":
                module = self.models.unet
                weighted = [p for p in graph_parts(None, self.models) if any(True for _ in p.parameters())]
                if weighted:  # extensions with weights of their own are in the graph too
                    module = ConditionedUNet(module, weighted)
            started = time.monotonic()
            self._fingerprints[component] = weights_fingerprint(module)
            logger.debug("hashed %s weights in %.1f s", component, time.monotonic() - started)
        return self._fingerprints[component]

    def _key(self, component: str, shape: UNetShape | VaeShape) -> EngineKey:
        if isinstance(shape, UNetShape):
            batch = shape.batch
            height = shape.latent_height * self.models.vae_scale_factor
            width = shape.latent_width * self.models.vae_scale_factor
            cfg_mode = f"b{shape.batch}"
            cross_frame = shape.cross_frame_groups is not None
            extra = extension_identity(shape)
        else:
            extra = {"cross_frame_groups": ""}
            batch, height, width, cfg_mode, cross_frame = 1, shape.height, shape.width, "none", False
        dtype = self._dtype_of(component)
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
        return EngineKey.create(
            component=component,
            identity={**self.models.identity, **extra},
            weights_hash=self._fingerprint("unet" if component == "unet" else "vae"),
            height=height,
            width=width,
            batch=batch,
            precision=precision,
            io_dtypes={"float": str(dtype).removeprefix("torch."), "timesteps": "int64"},
            opset=18,
            exporter=f"torch {torch.__version__}",
            cfg_mode=cfg_mode,
            cross_frame=cross_frame,
            refittable=self.settings.refittable,
            **self._runtime_fields(),
        )

    def _onnx(self, key: EngineKey, shape: UNetShape | VaeShape, progress: Progress | None) -> Path:
        """The exported graph of ``key`` (exported now when the cache has none)."""
        from engine.accel import onnx_export

        folder = self.cache.lookup(key)
        name = f"{key.component}.onnx"
        if folder is not None:
            return folder / name
        path = self.cache.file_path(key, name)
        started = time.monotonic()
        _say(progress, f"exporting {key.component} to ONNX ({key.folder_name()})")
        if isinstance(shape, UNetShape):
            onnx_export.export_unet(
                self.models.unet, shape, path, self.export_dtype, parts=graph_parts(shape, self.models)
            )
        elif key.component == "vae_encoder":
            onnx_export.export_vae_encoder(
                self.models.vae, shape, path, self._dtype_of(key.component), self.models.vae_scaling_factor
            )
        else:
            onnx_export.export_vae_decoder(
                self.models.vae, shape, path, self._dtype_of(key.component), self.models.vae_scaling_factor
            )
        files = {name: name}
        data = path.with_name(name + ".data")
        if data.exists():
            files[data.name] = data.name
        self.cache.write_manifest(key, files, build_seconds=time.monotonic() - started)
        return path


class OnnxRuntimeBackend(_ExportedBackend):
    """ONNX Runtime sessions over exported graphs; providers in the configured order."""

    name = "onnxruntime"

    def __init__(self, models: ModelBundle, vae_shape: VaeShape, settings: AccelSettings) -> None:
        super().__init__(models, vae_shape, settings)
        from engine.accel.onnxruntime_backend import choose_providers

        self.providers = choose_providers(settings.onnx_providers)

    def _runtime_fields(self) -> dict[str, str]:
        return {"tensorrt_version": "-", "gpu_name": "any", "compute_capability": "-"}

    def _load_unet(self, shape: UNetShape, progress: Progress | None) -> UNetRunner:
        from engine.accel.onnxruntime_backend import OrtUNet

        path = self._onnx(self._key("unet", shape), shape, progress)
        return OrtUNet(path, shape, self.providers)

    def _load_vae(self, shape: VaeShape, progress: Progress | None) -> VaeRunner:
        from engine.accel.onnxruntime_backend import OrtVae

        encoder_key, decoder_key = self.vae_keys(shape)
        encoder = self._onnx(encoder_key, shape, progress)
        decoder = self._onnx(decoder_key, shape, progress)
        return OrtVae(encoder, decoder, shape, self.providers)

    def describe(self) -> str:
        return f"onnxruntime ({', '.join(self.providers)})"

    def set_lora_scales(self, old: Sequence[float], new: Sequence[float]) -> None:
        """Refused: the weights are baked into the exported graphs (``ParamError``)."""
        if list(old) != list(new):
            raise ParamError(
                "lora_scales",
                "the onnxruntime backend has the LoRA weights baked into its exported graphs: a "
                "re-export is needed — set the scales in model.loras and restart",
            )


class TensorRTBackend(_ExportedBackend):
    """Native TensorRT engines built from fp16 ONNX exports, cached by ``EngineKey``."""

    name = "tensorrt"

    def _runtime_fields(self) -> dict[str, str]:
        from engine.accel.tensorrt_backend import gpu_facts, tensorrt_version

        gpu_name, capability = gpu_facts(self.models.device)
        return {
            "tensorrt_version": tensorrt_version() or "-",
            "gpu_name": gpu_name,
            "compute_capability": capability,
        }

    def _plan(self, key: EngineKey, shape: UNetShape | VaeShape, progress: Progress | None) -> Path:
        from engine.accel.tensorrt_backend import TqdmProgress, build_engine

        folder = self.cache.lookup(key)
        plan_name = f"{key.component}.plan"
        if folder is not None and (folder / plan_name).exists():
            return folder / plan_name
        onnx_key = dataclasses.replace(key, tensorrt_version="-", refittable=False)
        onnx_path = self._onnx(onnx_key, shape, progress)
        plan = self.cache.file_path(key, plan_name)
        _say(progress, f"building TensorRT engine {key.folder_name()} (minutes; cached afterwards)")
        started = time.monotonic()
        report = TqdmProgress()
        try:
            build_engine(
                onnx_path,
                shape,
                key.component,
                plan,
                self.cache.timing_cache_path(key),
                refittable=self.settings.refittable,
                progress=report,
                cancel=self._cancel_event(shape),
            )
        finally:
            report.close()
        self.cache.write_manifest(key, {plan_name: plan_name}, build_seconds=time.monotonic() - started)
        return plan

    def _load_unet(self, shape: UNetShape, progress: Progress | None) -> UNetRunner:
        from engine.accel.tensorrt_backend import TrtUNet

        plan = self._plan(self._key("unet", shape), shape, progress)
        return TrtUNet(plan, use_cuda_graph=self.settings.cuda_graph)

    def _load_vae(self, shape: VaeShape, progress: Progress | None) -> VaeRunner:
        from engine.accel.tensorrt_backend import TrtVae

        encoder_key, decoder_key = self.vae_keys(shape)
        encoder = self._plan(encoder_key, shape, progress)
        decoder = self._plan(decoder_key, shape, progress)
        return TrtVae.from_plans(encoder, decoder)

    def describe(self) -> str:
        return "tensorrt (static engines)"

    def set_lora_scales(self, old: Sequence[float], new: Sequence[float]) -> None:
        """Refit every loaded UNet engine, then the torch UNet; ``ParamError`` (nothing changed)
        when the engines are not refittable or an engine is being built from the current weights."""
        from engine.accel.tensorrt_backend import lora_change_plan

        sources = [str(path) for path, _ in self.models.identity.get("loras", [])]
        if len(sources) != len(old) or len(sources) != len(new):
            sources = [f"lora_{i}" for i in range(len(new))]
        plan = lora_change_plan(
            self.settings.refittable,
            list(zip(sources, old, strict=True)),
            list(zip(sources, new, strict=True)),
        )
        if plan == "none":
            return
        if plan == "rebuild":
            raise ParamError(
                "lora_scales",
                "this TensorRT engine was not built refittable (acceleration.refittable: false): "
                "a rebuild is needed — run `latentstage build` with the new scales in model.loras, "
                "or set acceleration.refittable: true",
            )
        if self.busy:
            raise ParamError(
                "lora_scales",
                "engines are being built for a shape change from the current weights; send the "
                "scales again when /engine/building is empty",
            )
        try:
            self.refit_unet(rescaled_unet_weights(self.models, old, new))
        except (RuntimeError, KeyError, NotImplementedError) as err:
            raise ParamError("lora_scales", f"the engine refit failed: {err}") from err
        rescale_bundle(self.models, old, new)

    def refit_unet(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Refit every loaded UNet engine with these torch-named UNet weights (new values).

        Call before the torch UNet itself changes, always with the same names (every weight the
        LoRAs touch): names map to ONNX initializers by ``onnx_export.initializer_map``, matched
        once per engine against the weights it was exported from. The weights fingerprint is
        forgotten afterwards, so engines built later are keyed by the new weights.
        """
        from engine.accel import onnx_export

        with self._lock:
            runners = dict(self._runners)
        for shape in runners:
            known = self._refit_names.get(shape)
            if known is not None and set(weights) <= set(known):
                continue
            key = self._key("unet", shape)
            onnx_key = dataclasses.replace(key, tensorrt_version="-", refittable=False)
            folder = self.cache.lookup(onnx_key)
            if folder is None:
                raise RuntimeError(f"the ONNX export of {key.folder_name()} is gone: cannot map names")
            self._refit_names[shape] = onnx_export.initializer_map(
                folder / "unet.onnx", self.models.unet, weights
            )
        for shape, runner in runners.items():
            names = self._refit_names[shape]
            payload = {}
            for name, value in weights.items():
                init_name, transposed = names[name]
                tensor = value.T if transposed else value
                payload[init_name] = tensor.detach().to(self.export_dtype).contiguous()
            runner.refit(payload)  # type: ignore[attr-defined]
        self._fingerprints.pop("unet", None)


def unavailable_reason(kind: BackendKind) -> str | None:
    """Why a backend cannot run here (None: it can)."""
    if kind is BackendKind.TORCH:
        return None
    if kind is BackendKind.ONNXRUNTIME:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as err:
            return f"{err.name} is not installed (pip install latentstage[onnx])."
        return None
    from engine.accel.tensorrt_backend import unavailable_reason as trt_reason

    return trt_reason()


_warned: set[str] = set()


def create_backend(models: ModelBundle, vae_shape: VaeShape, settings: AccelSettings) -> Backend:
    """The configured backend, or torch with one WARNING when it cannot run and fallback allows.

    Raises:
        BackendUnavailableError: the backend cannot run and ``acceleration.fallback`` is ``error``;
            the message names the missing piece.
    """
    from engine.accel.tensorrt_backend import fallback_decision

    decision, message = fallback_decision(
        settings.backend, settings.fallback, unavailable_reason(settings.backend)
    )
    if decision == "error":
        raise BackendUnavailableError(message)
    if decision == "fallback":
        if message not in _warned:
            _warned.add(message)
            logger.warning("%s", message)
        return TorchBackend(models, settings.compile, settings.cuda_graph)
    if settings.backend is BackendKind.TORCH:
        return TorchBackend(models, settings.compile, settings.cuda_graph)
    if settings.backend is BackendKind.ONNXRUNTIME:
        return OnnxRuntimeBackend(models, vae_shape, settings)
    return TensorRTBackend(models, vae_shape, settings)


def _say(progress: Progress | None, text: str) -> None:
    report(logger, progress, text)
