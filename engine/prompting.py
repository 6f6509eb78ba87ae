"""Text → prompt embeddings, cached so a prompt is encoded once until it falls out of the cache."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.stream.blend import blend_embeddings, slerp
from engine.stream.guidance import layout_embeddings
from engine.stream.modes import BlendMethod, CfgType
from engine.stream.pooled import pack_pooled

if TYPE_CHECKING:
    from engine.extensions.base import Extension

logger = logging.getLogger(__name__)


class PromptEncoder:
    """Encodes prompts with the model's tokenizer and text encoder(s); thread-safe LRU cache.

    SD 1.x / 2.x (one encoder): ``encode`` returns its last hidden state ``(1, 77, D)``.
    SDXL (``text_encoder_2`` given): the penultimate hidden states of both encoders
    concatenated, ``(1, 77, D1 + D2)``, with the second encoder's pooled projection ``(1, P)``
    packed in front as a leading token (``engine.stream.pooled``): ``(1, 78, D1 + D2)``. Both
    encoders run once per prompt, together. Results are in the working
    dtype on the working device. ``encode`` may be called from a worker thread while the frame
    loop runs; the cache is guarded by a lock.
    """

    def __init__(
        self,
        text_encoder: Any,
        tokenizer: Any,
        device: torch.device,
        dtype: torch.dtype,
        cache_size: int = 64,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
    ) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
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

    def clear(self) -> None:
        """Forget every cached embedding (the text encoder's weights changed: LoRA scales)."""
        with self._lock:
            self._cache.clear()

    def encode_blend(self, pairs: Sequence[tuple[str, float]], method: BlendMethod) -> torch.Tensor:
        """Weighted mix of several prompts' embeddings (linear or slerp)."""
        embeddings = [self.encode(prompt) for prompt, _ in pairs]
        return blend_embeddings(embeddings, [w for _, w in pairs], method)

    @torch.inference_mode()
    def _run(self, prompt: str) -> torch.Tensor:
        self.encoder_calls += 1
        logger.debug("encoding prompt %.60r", prompt)
        if self.text_encoder_2 is None:
            return self.text_encoder(self._ids(self.tokenizer, prompt), return_dict=False)[0].to(self.dtype)
        first = self.text_encoder(self._ids(self.tokenizer, prompt), output_hidden_states=True)
        second = self.text_encoder_2(self._ids(self.tokenizer_2, prompt), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1).to(self.dtype)
        return pack_pooled(hidden, second[0].to(self.dtype))

    def _ids(self, tokenizer: Any, prompt: str) -> torch.Tensor:
        max_length = int(getattr(tokenizer, "model_max_length", 77))
        return tokenizer(
            prompt,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)


class PromptLayout:
    """The prompt embeddings a pipeline plays, and what the UNet gets of them.

    ``positive`` and ``negative`` ``(1, L, D)``: the encoded prompts with what the extensions
    append (e.g. IP-Adapter image tokens); ``transition``: a running crossfade ``(previous,
    progress)``; ``embeddings`` ``(B, L, D)``: both laid out for the cfg mode
    (``engine.stream.guidance``); ``unet_embeddings``: the UNet's tokens of them, after the
    extensions took their parts (e.g. SDXL's pooled embeddings).
    """

    def __init__(self, encoder: PromptEncoder, extensions: Mapping[str, Extension]) -> None:
        self.encoder = encoder
        self.extensions = extensions
        self.transition: tuple[torch.Tensor, float] | None = None
        self.positive = self.negative = self.embeddings = self.unet_embeddings = torch.empty(0)

    def encode(self, state: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive and negative embeddings of ``state``'s prompts (encoder cache first)."""
        method = BlendMethod(state["prompt_blend_method"])
        blend = state["prompt_blend"]
        positive = self.encoder.encode_blend(blend, method) if blend else self.encoder.encode(state["prompt"])
        negative = self.encoder.encode(state["negative_prompt"])
        for extension in self.extensions.values():
            positive, negative = extension.extend_prompt(state, positive, negative)
        return positive, negative

    def play(
        self, positive: torch.Tensor, negative: torch.Tensor, embeddings: torch.Tensor, size: tuple[int, int]
    ) -> None:
        """Play these prompts, laid out as ``embeddings``, at frame ``size`` ``(height, width)``."""
        self.positive, self.negative = positive, negative
        self.lay_out(embeddings, size)

    def lay_out(self, embeddings: torch.Tensor, size: tuple[int, int]) -> None:
        """``embeddings`` ``(B, L, D)`` and the UNet's tokens of them."""
        self.embeddings = tokens = embeddings
        for extension in self.extensions.values():
            tokens = extension.take_embeddings(tokens, size)
        self.unet_embeddings = tokens

    @property
    def current_positive(self) -> torch.Tensor:
        """The positive embedding ``(1, L, D)`` in use now (mid-crossfade: the mix)."""
        if self.transition is None:
            return self.positive
        previous, progress = self.transition
        return slerp(previous, self.positive, progress)

    def crossfade(
        self, previous: torch.Tensor | None, progress: float, cfg_type: CfgType, n: int, size: tuple[int, int]
    ) -> None:
        """``slerp(previous, positive, progress)`` laid out; ``previous=None`` or ``progress >= 1``
        ends it."""
        if previous is None or progress >= 1.0:
            self.transition = None
            mixed = self.positive
        else:
            self.transition = (previous, max(0.0, float(progress)))
            mixed = self.current_positive
        self.lay_out(layout_embeddings(cfg_type, n, mixed, self.negative), size)
