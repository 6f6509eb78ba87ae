"""Stochastic similarity filter: skip near-identical input frames with a seeded probability."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def skip_probability(cosine: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P(skip) = max(0, (cos − η) / (1 − η))`` elementwise, η = ``threshold`` < 1."""
    return ((cosine - threshold) / (1.0 - threshold)).clamp_min(0.0)


class SimilarityFilter:
    """Decides per frame whether to skip the VAE/UNet work and re-emit the previous output.

    The reference is the last frame actually processed. After ``max_skip_frames`` skips in
    a row the next frame is forced through. Random draws come from a ``random.Random``
    seeded once, so a run is repeatable. The cosine is computed where the frame lives; one
    scalar crosses to the host per frame (a non-blocking copy on CUDA, never a device-wide
    synchronize).
    """

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, seed: int = 0) -> None:
        self.threshold, self.max_skip_frames = 0.98, 10
        self.configure(threshold, max_skip_frames)
        self._rng = random.Random(seed)
        self._reference: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self.consecutive_skips = 0
        self.last_probability = 0.0

    def configure(self, threshold: float, max_skip_frames: int) -> None:
        """Change η and the forced-frame bound (a parameter change; keeps the reference)."""
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold {threshold!r} is out of range; allowed: [0, 1)")
        if max_skip_frames < 0:
            raise ValueError(f"max_skip_frames {max_skip_frames!r} must be >= 0")
        self.threshold = float(threshold)
        self.max_skip_frames = int(max_skip_frames)

    def reset(self) -> None:
        """Forget the reference frame (next frame is always processed)."""
        self._reference = None
        self.consecutive_skips = 0

    def mark_processed(self, frame: torch.Tensor) -> None:
        """Record ``frame`` as processed without a decision (e.g. while the stream warms up)."""
        if self._reference is None or self._reference.shape != frame.shape:
            self._reference = frame.detach().clone()
        else:
            self._reference.copy_(frame)
        self.consecutive_skips = 0

    def should_skip(self, frame: torch.Tensor) -> bool:
        """True when ``frame`` (any shape, float) may be skipped; updates the reference if not."""
        if self._reference is None or self._reference.shape != frame.shape:
            self.mark_processed(frame)
            return False
        current, reference = frame.flatten().float(), self._reference.flatten().float()
        cosine = F.cosine_similarity(current, reference, dim=0)
        probability = self._to_host(skip_probability(cosine, self.threshold))
        self.last_probability = probability
        forced = self.consecutive_skips >= self.max_skip_frames
        if not forced and self._rng.random() < probability:
            self.consecutive_skips += 1
            return True
        self._reference.copy_(frame)
        self.consecutive_skips = 0
        return False

    def _to_host(self, scalar: torch.Tensor) -> float:
        if scalar.device.type != "cuda":
            return float(scalar)
        if self._host is None:
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
        self._host.copy_(scalar, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        # the skip decision is a host branch (a skipped frame launches no VAE/UNet work), so one
        # float must reach the host: this waits for the work queued on this stream up to the
        # copy (not for other streams), once per frame and only while the filter is on
        event.synchronize()
        return float(self._host)
