"""Put the feature cache's attention processors on a UNet, and take them off again exactly."""

from __future__ import annotations

from typing import Any

from engine.models.ip_attention import PlainAttnProcessor
from engine.stream.feature_bank import FeatureBankAttnProcessor


def install_feature_bank(
    unet: Any, groups: tuple[tuple[int, int], ...] | None = None
) -> tuple[list[FeatureBankAttnProcessor], dict[str, Any]]:
    """Route every attn1 layer of ``unet`` through a ``FeatureBankAttnProcessor`` (layer index in
    ``attn_processors`` order, cross-frame ``groups`` if any); plain attn2 layers take
    ``PlainAttnProcessor`` (the same math; it accepts the bank's call arguments), IP-Adapter
    ones stay. Returns the new attn1 processors and the processors before, for ``restore``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    before = dict(unet.attn_processors)
    bank: list[FeatureBankAttnProcessor] = []
    processors: dict[str, Any] = {}
    for name, current in before.items():
        if name.endswith("attn1.processor"):
            processor = FeatureBankAttnProcessor(len(bank), groups, fallback=current)
            bank.append(processor)
            processors[name] = processor
        elif type(current) is AttnProcessor2_0:
            processors[name] = PlainAttnProcessor()
        else:
            processors[name] = current
    unet.set_attn_processor(processors)
    return bank, before


def restore(unet: Any, before: dict[str, Any]) -> None:
    """The processors ``install_feature_bank`` replaced, back in place."""
    unet.set_attn_processor(dict(before))
