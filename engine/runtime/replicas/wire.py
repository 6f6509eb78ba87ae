"""What the engine and a replica say to each other: messages over a two-member torch.distributed group.

Each replica has a group of its own with the engine (rank 0: the engine, rank 1: the replica), so
one replica's death or restart never touches another's (a torch.distributed group cannot take a new
member). The rendezvous is a ``FileStore`` in a private temporary folder, and gloo binds its pairs to
127.0.0.1: no port is opened to the network. A message is a header (``int64[4]``: kind, frame index,
JSON length, tensor count), the JSON (plain values, never pickle) and its tensors as raw bytes.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ENGINE_RANK, REPLICA_RANK = 0, 1
_TO_REPLICA, _TO_ENGINE = 0, 1  # tags: one ordered channel each way
_HEADER = 4
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype for dtype in (torch.float16, torch.bfloat16, torch.float32)
}
MAX_JSON_BYTES = 64 * 1024 * 1024


class Kind(IntEnum):
    """What a message is."""

    HELLO = 1  # replica → engine: loaded, with its weights' fingerprint
    CHANGE = 2  # engine → replica: commit these values before frame ``index``
    FRAME = 3  # engine → replica: make frame ``index``
    OUTPUT = 4  # replica → engine: what frame ``index`` gave
    STOP = 5  # engine → replica: end


@dataclass
class Message:
    """One message: ``kind``, the frame ``index`` it belongs to, plain ``data`` and tensors.

    ``tensors`` may hold ``None`` (nothing sent in that place); the receiver gets the same list.
    """

    kind: Kind
    index: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor | None] = field(default_factory=list)


def plain(value: Any) -> Any:
    """``value`` as JSON-able data (enums by value, tuples as lists)."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


class Link:
    """One replica's group with the engine: ordered messages each way.

    ``send`` and ``recv`` block (the engine calls them on a replica's own threads, never on the frame
    loop); a peer that died makes them raise ``RuntimeError`` at once, a peer that hangs makes them
    wait (the engine's deadline takes it out, and killing the process ends the wait).
    """

    def __init__(self, group: Any, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.peer = REPLICA_RANK if rank == ENGINE_RANK else ENGINE_RANK
        self._send_tag = _TO_REPLICA if rank == ENGINE_RANK else _TO_ENGINE
        self._recv_tag = _TO_ENGINE if rank == ENGINE_RANK else _TO_REPLICA

    @classmethod
    def join(cls, store_file: Path, rank: int, timeout_s: float) -> Link:
        """Both ends call this with the same ``store_file``; returns when both are there.

        Raises:
            RuntimeError: the other end did not come within ``timeout_s``.
        """
        store = dist.FileStore(str(store_file), 2)
        store.set_timeout(datetime.timedelta(seconds=timeout_s))
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = datetime.timedelta(days=365)  # idle links wait for frames as long as the show
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return cls(dist.ProcessGroupGloo(store, rank, 2, options), rank)

    def send(self, message: Message) -> None:
        body = json.dumps(
            {"data": message.data, "tensors": [_describe(tensor) for tensor in message.tensors]}
        ).encode()
        header = torch.tensor([int(message.kind), message.index, len(body), len(message.tensors)])
        self._send(header)
        self._send(torch.frombuffer(bytearray(body), dtype=torch.uint8))
        for tensor in message.tensors:
            if tensor is not None:
                self._send(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8))

    def recv(self) -> Message:
        header = torch.empty(_HEADER, dtype=torch.int64)
        self._recv(header)
        kind, index, length, count = (int(value) for value in header.tolist())
        if not 0 < length <= MAX_JSON_BYTES:
            raise RuntimeError(f"a message of {length} bytes: allowed 1..{MAX_JSON_BYTES}")
        body = torch.empty(length, dtype=torch.uint8)
        self._recv(body)
        decoded = json.loads(body.numpy().tobytes())
        descriptions = decoded["tensors"]
        if len(descriptions) != count:
            raise RuntimeError(f"a message announced {count} tensors and described {len(descriptions)}")
        tensors: list[torch.Tensor | None] = []
        for description in descriptions:
            if description is None:
                tensors.append(None)
                continue
            dtype = _DTYPES[description["dtype"]]
            shape = [int(size) for size in description["shape"]]
            raw = torch.empty(_nbytes(shape, dtype), dtype=torch.uint8)
            self._recv(raw)
            tensors.append(raw.view(dtype).view(shape))
        return Message(Kind(kind), index, decoded["data"], tensors)

    def _send(self, tensor: torch.Tensor) -> None:
        self.group.send([tensor], self.peer, self._send_tag).wait()

    def _recv(self, tensor: torch.Tensor) -> None:
        self.group.recv([tensor], self.peer, self._recv_tag).wait()


def link_error(err: BaseException) -> str:
    """The gist of a broken link: gloo's text without its source location and its advice."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0][:160]


def _describe(tensor: torch.Tensor | None) -> dict[str, Any] | None:
    if tensor is None:
        return None
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"a tensor of {tensor.dtype} cannot be sent; allowed: {', '.join(_DTYPES)}")
    return {"dtype": name, "shape": list(tensor.shape)}


def _nbytes(shape: list[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()
