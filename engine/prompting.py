"""Text → prompt embeddings, cached so a prompt is encoded once until it falls out of the cache."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from engine.stream.blend import blend_embeddings
from engine.stream.modes import BlendMethod

logger = logging.getLogger(__name__)


class PromptEncoder:
    """Encodes prompts with the model's tokenizer and text encoder; thread-safe LRU cache.

    ``encode`` returns ``(1, 77, D)`` in the working dtype on the working device. It may be
    called from a worker thread while the frame loop runs; the cache is guarded by a lock.
    """

    def __init__(
        self,
        text_encoder: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int = 64,
    ) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.encoder_calls = 0

    def encode(self, prompt: str) -> torch.Tensor:
        """Embedding ``(1, 77, D)`` of ``prompt``; runs the text encoder only on a cache miss."""
        with self._lock:
            cached = self._cache.get(prompt)
            if cached is not None:
                self._cache.move_to_end(prompt)
                return cached
        embedding = self._run(prompt)
        with self._lock:
            self._cache[prompt] = embedding
            self._cache.move_to_end(prompt)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedding

    def encode_blend(self, pairs: Sequence[tuple[str, float]], method: BlendMethod) -> torch.Tensor:
        """Weighted mix of several prompts' embeddings (linear or slerp)."""
        embeddings = [self.encode(prompt) for prompt, _ in pairs]
        return blend_embeddings(embeddings, [w for _, w in pairs], method)

    @torch.inference_mode()
    def _run(self, prompt: str) -> torch.Tensor:
        max_length = int(getattr(self.tokenizer, "model_max_length", 77))
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        self.encoder_calls += 1
        logger.debug("encoding prompt %.60r", prompt)
        hidden = self.text_encoder(ids, return_dict=False)[0]
        return hidden.to(self.dtype)
