"""ONNX Runtime backend: ``UNetRunner`` / ``VaeRunner`` over graphs written by ``onnx_export``.

Sessions run with every graph optimization and ONNX Runtime's default thread count, on the
requested execution providers that exist here (``choose_providers``), CPU always last.
Tensors on the CPU go through ``session.run`` as numpy views (no copies where dtypes match);
CUDA tensors are bound in place with IOBinding when the session runs on CUDA or TensorRT (on
torch's current stream, into a fresh output from torch's caching allocator: callers may keep
or modify what they get). ONNX Runtime is imported only here and only when a runner or
provider query needs it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from engine.accel.base import Conditioning, GraphIO, UNetShape, VaeShape, unet_feeds
from engine.accel.onnx_export import INSTALL_HINT, OnnxUnavailableError, require

__all__ = [
    "INSTALL_HINT",
    "OnnxModelMismatchError",
    "OnnxUnavailableError",
    "OrtUNet",
    "OrtVae",
    "choose_providers",
    "providers_available",
]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
DEVICE_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
"""Providers whose sessions take CUDA tensors in place (IOBinding)."""
_TORCH_DTYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}
_NUMPY_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
}

ProviderOptions = Mapping[str, Mapping[str, Any]]


class OnnxModelMismatchError(ValueError):
    """The ONNX graph's IO names or shapes are not the ones the runner was built for."""


def _onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, or ``OnnxUnavailableError`` naming the extra to install."""
    return require("onnxruntime")


def providers_available() -> list[str]:
    """Execution providers this ONNX Runtime build offers, in its priority order."""
    return list(_onnxruntime().get_available_providers())


def choose_providers(requested: Sequence[str]) -> list[str]:
    """The requested providers that exist here, in the requested order, CPU always last.

    Missing providers are dropped with one WARNING naming them. ``CPUExecutionProvider`` is
    moved (or added) to the end so it only takes what the others cannot run.

    Raises:
        OnnxUnavailableError: onnxruntime is not installed.
        RuntimeError: nothing usable is left (not even the CPU provider).
    """
    available = providers_available()
    wanted = list(dict.fromkeys(requested))
    missing = [name for name in wanted if name not in available]
    if missing:
        logger.warning(
            "ONNX Runtime providers not available here, skipped: %s (available: %s)",
            ", ".join(missing),
            ", ".join(available) or "none",
        )
    chosen = [name for name in wanted if name in available and name != CPU]
    if CPU in available:
        chosen.append(CPU)
    if not chosen:
        raise RuntimeError(
            f"no usable ONNX Runtime provider: requested {list(requested)}, available {available}"
        )
    return chosen


class _OrtGraph:
    """One InferenceSession with fixed IO names and static shapes, one output, torch in and out."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        io: GraphIO,
        built_for: str,
        providers: Sequence[str],
        provider_options: ProviderOptions | None,
        threads: int,
    ) -> None:
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist (export it first)")
        chosen = choose_providers(providers)
        options = {name: dict((provider_options or {}).get(name, {})) for name in chosen}
        # ORT reads user_compute_stream once, and ignores a null (default-stream) handle: give it
        # a stream of its own that each run orders against the caller's current stream
        self._stream: torch.cuda.Stream | None = None
        if torch.cuda.is_available() and any(name in options for name in DEVICE_PROVIDERS):
            self._stream = torch.cuda.Stream()
        for name in DEVICE_PROVIDERS:
            if name in options and self._stream is not None:
                options[name].setdefault("device_id", str(torch.cuda.current_device()))
                options[name].setdefault("user_compute_stream", str(self._stream.cuda_stream))
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = threads
        # idle ORT threads must not spin: torch runs the stream math between calls on the same cores
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(self.path),
            sess_options=session_options,
            providers=[(name, options[name]) for name in chosen],
        )
        self.input_names = tuple(io.inputs)
        self.outputs = dict(io.outputs)
        self._check_io({**io.inputs, **io.outputs}, built_for)
        self.input_dtypes = {i.name: _TORCH_DTYPES[i.type] for i in self.session.get_inputs()}
        self.output_dtypes = {o.name: _TORCH_DTYPES[o.type] for o in self.session.get_outputs()}
        self.on_device = self.session.get_providers()[0] in DEVICE_PROVIDERS
        self._binding = self.session.io_binding() if self.on_device and self._stream is not None else None
        logger.info("loaded %s on %s", self.path.name, ", ".join(self.session.get_providers()))

    def _check_io(self, expected: Mapping[str, tuple[int, ...]], built_for: str) -> None:
        nodes = [*self.session.get_inputs(), *self.session.get_outputs()]
        actual = {node.name: tuple(node.shape) for node in nodes}
        wanted = {name: tuple(shape) for name, shape in expected.items()}
        unknown = sorted({node.type for node in nodes} - set(_TORCH_DTYPES))
        if actual != wanted or unknown:
            raise OnnxModelMismatchError(
                f"ONNX model {self.path} has IO shapes {actual}"
                + (f" with unsupported types {unknown}" if unknown else "")
                + f", but this runner was built for {built_for} and expects {wanted}; "
                "export the model again for this shape"
            )

    def close(self) -> None:
        """Release the session (its device memory) now rather than at garbage collection; safe twice."""
        self._binding = None
        self.session = None

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Run on ``tensors`` (in ``input_names`` order); the first output, with the first input's
        device/dtype."""
        return self.run_all(tensors)[0]

    def run_all(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Every output in graph order, each with the first input's device and dtype."""
        first = tensors[0]
        if first.is_cuda and self._binding is not None:
            results = self._run_bound(tensors)
        else:
            feeds = {
                name: tensor.detach().to(device="cpu", dtype=self.input_dtypes[name]).contiguous().numpy()
                for name, tensor in zip(self.input_names, tensors)
            }
            results = tuple(torch.from_numpy(out) for out in self.session.run(list(self.outputs), feeds))
        return tuple(result.to(device=first.device, dtype=first.dtype) for result in results)

    def _run_bound(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """IOBinding on CUDA: inputs and a new output bound at their data pointers, no copies.

        ORT runs on its own stream, after the caller's stream's pending work; the caller's
        stream then waits for ORT's. (ORT itself may wait for its stream before returning.)
        """
        binding, stream = self._binding, self._stream
        assert binding is not None and stream is not None
        device = tensors[0].device
        index = device.index if device.index is not None else torch.cuda.current_device()
        caller = torch.cuda.current_stream(device)
        bound = [
            tensor.detach().to(device=device, dtype=self.input_dtypes[name]).contiguous()
            for name, tensor in zip(self.input_names, tensors)
        ]
        stream.wait_stream(caller)
        for tensor in bound:  # ORT may still read them after this returns: keep their memory
            tensor.record_stream(stream)
        for name, tensor in zip(self.input_names, bound):
            binding.bind_input(
                name, "cuda", index, _NUMPY_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()
            )
        outputs = []
        for name, shape in self.outputs.items():
            output = torch.empty(shape, device=device, dtype=self.output_dtypes[name])
            binding.bind_output(
                name, "cuda", index, _NUMPY_DTYPES[output.dtype], tuple(output.shape), output.data_ptr()
            )
            outputs.append(output)
        self.session.run_with_iobinding(binding)
        caller.wait_stream(stream)
        return tuple(outputs)


class OrtUNet:
    """``UNetRunner`` over an exported UNet graph (``onnx_export.export_unet``).

    Args:
        path: the ``.onnx`` file.
        shape: the ``UNetShape`` it was exported for; checked against the graph.
        providers: execution providers in priority order (see ``choose_providers``).
        provider_options: per-provider options, e.g. ``{"CUDAExecutionProvider": {"device_id": 0}}``.
        threads: intra-op threads (0: ONNX Runtime's default).

    Raises:
        OnnxUnavailableError: onnxruntime is not installed.
        OnnxModelMismatchError: the graph's IO is not the one of ``shape``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: UNetShape,
        providers: Sequence[str] = (CPU,),
        provider_options: ProviderOptions | None = None,
        threads: int = 0,
    ) -> None:
        self.shape = shape
        self.graph = _OrtGraph(path, shape.io, repr(shape), providers, provider_options, threads)

    def __call__(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeddings: torch.Tensor,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        feeds = unet_feeds(self.graph.input_names, latents, timesteps, embeddings, conditioning)
        prediction, *more = self.graph.run_all(list(feeds.values()))
        if conditioning is not None:
            for name, tensor in zip(list(self.graph.outputs)[1:], more):
                conditioning.give(name, tensor)
        return prediction

    def close(self) -> None:
        """Release the session; safe twice."""
        self.graph.close()


class OrtVae:
    """``VaeRunner`` over exported encoder and decoder graphs (``onnx_export.export_vae_*``).

    The scaling factor is inside the graphs, so ``encode``/``decode`` equal ``TorchVae``'s.
    Arguments as ``OrtUNet``, with the two files and the ``VaeShape`` they were exported for.
    """

    def __init__(
        self,
        encoder_path: str | os.PathLike[str],
        decoder_path: str | os.PathLike[str],
        shape: VaeShape,
        providers: Sequence[str] = (CPU,),
        provider_options: ProviderOptions | None = None,
        threads: int = 0,
    ) -> None:
        self.shape = shape
        self.encoder, self.decoder = (
            _OrtGraph(graph_path, io, repr(shape), providers, provider_options, threads)
            for graph_path, io in ((encoder_path, shape.encoder_io), (decoder_path, shape.decoder_io))
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def close(self) -> None:
        """Release both sessions; safe twice."""
        self.encoder.close()
        self.decoder.close()
