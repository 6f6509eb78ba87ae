"""The one error raised when model weights, devices or dtypes cannot be resolved or loaded."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model, LoRA, VAE, device or dtype could not be found or loaded.

    The message is one or two lines that name what was asked for, why it failed
    and what to do instead; the underlying exception is chained as ``__cause__``.
    """


def short_reason(err: BaseException, limit: int = 200) -> str:
    """The first line of ``err``'s message (or its type name), cut to ``limit`` characters."""
    text = str(err).strip()
    first = text.splitlines()[0].strip().rstrip(".") if text else ""
    reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return reason if len(reason) <= limit else reason[: limit - 1].rstrip() + "…"
