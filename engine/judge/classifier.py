"""The judge: a small CNN that names the pattern and the colours of a picture, and scores a prompt."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.judge.drawings import COLOR_NAMES, PATTERNS, parse_prompt

JUDGE_WEIGHTS = Path(__file__).with_name("weights") / "judge.safetensors"
JUDGE_SHA256 = "dcd2ecec8b383c372300a5ad487fcdf429408fe5545900b9d12c710bcd1fbc52"
"""The shipped judge's checksum (scripts/train_builtin.py prints it at export)."""
JUDGE_SIZE = 64  # pictures are resized to 64x64 before judging


class Judge(nn.Module):
    """Pattern (softmax over ``PATTERNS``) and dominant colours (sigmoid per ``COLOR_NAMES``).

    A colour dominates when it fills a large part of the picture: both colours of a drawing,
    the one colour of a tinted picture, none of a many-coloured photo-like one.

    ``forward(images)`` takes ``(B, 3, H, W)`` float in [0, 1] (any size; resized to 64²) and
    returns ``(pattern_logits (B, 9), color_logits (B, 10))``.
    """

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(widths):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
        self.features = nn.Sequential(*layers)
        self.pattern_head = nn.Linear(2 * widths[-1], len(PATTERNS))
        self.color_head = nn.Linear(2 * widths[-1], len(COLOR_NAMES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(images, size=(JUDGE_SIZE, JUDGE_SIZE), mode="area") * 2.0 - 1.0
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.pattern_head(pooled), self.color_head(pooled)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """How well each picture follows ``prompt``: ``(B,)`` in [0, 1].

        The mean of P(colour dominates) over the prompt's colour words and P(pattern) of its
        pattern word, if it names one (a colour alone asks for that colour, whatever the shapes).

        Raises:
            ValueError: the prompt names no colour and no pattern the judge knows.
        """
        colors, pattern = parse_prompt(prompt)
        if not colors and pattern is None:
            raise ValueError(
                f"the judge cannot score {prompt!r}: name a colour ({', '.join(COLOR_NAMES)}) "
                f"or a pattern ({', '.join(PATTERNS)})."
            )
        pattern_logits, color_logits = self(images.float().clamp(0.0, 1.0))
        parts = [torch.sigmoid(color_logits[:, COLOR_NAMES.index(c)]) for c in colors]
        if pattern is not None:
            parts.append(torch.softmax(pattern_logits, dim=1)[:, PATTERNS.index(pattern)])
        return torch.stack(parts, dim=1).mean(dim=1)


def load_judge(path: Path = JUDGE_WEIGHTS) -> Judge:
    """The judge shipped in the package, in eval mode on the CPU."""
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    judge.eval().requires_grad_(False)
    return judge
