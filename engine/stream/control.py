"""ControlNet inputs of the stream batch: each slot's control image, each slot's scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.stream.guidance import expand_for_unet
from engine.stream.modes import CfgType


def slot_scales(
    scales: Sequence[float],
    windows: Sequence[tuple[float, float]],
    t_index_list: Sequence[int],
    num_inference_steps: int,
    cfg_type: CfgType,
) -> tuple[torch.Tensor, tuple[bool, ...]]:
    """Per-row ControlNet scales ``(K, B)`` of one UNet call, and which ControlNets are active.

    Slot i denoises at step ``t_index_list[i]`` of ``num_inference_steps``; a ControlNet with
    window ``(start, end)`` acts on it when ``start <= t/N`` and ``(t + 1)/N <= end`` (diffusers'
    ``control_guidance_start``/``end``), with its scale, else with 0. Rows follow the UNet
    layout (``expand_for_unet``). A ControlNet whose rows are all 0 is inactive. Float32, CPU.
    """
    steps = float(num_inference_steps)
    rows = []
    for scale, (start, end) in zip(scales, windows, strict=True):
        acts = [start <= t / steps and (t + 1) / steps <= end for t in t_index_list]
        rows.append([float(scale) if on else 0.0 for on in acts])
    table = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(t_index_list))
    laid_out = expand_for_unet(cfg_type, table.T).T.contiguous()
    active = tuple(bool(any(value != 0.0 for value in row)) for row in rows)
    return laid_out, active


class ControlSlots:
    """The control image of every stream-batch slot: slot i holds the condition of the frame that
    slot i came from, so each latent is steered by the structure of its own frame.

    A ring of ``n`` rows per ControlNet: ``push`` writes the newest frame's conditions into the
    row that becomes slot 0 (no copies of the others); ``unet_images`` gathers the rows in slot
    order and lays them out for the UNet call. Before the batch is full the empty slots are
    black. Shapes: conditions ``(1, 3, H, W)`` in [0, 1]; ``unet_images`` ``(K, B, 3, H, W)``.

    Args:
        count: K, the ControlNets.
        n: stream slots.
        size: ``(H, W)`` of the frames.
    """

    def __init__(
        self,
        count: int,
        n: int,
        size: tuple[int, int],
        cfg_type: CfgType,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.count, self.n, self.size, self.cfg_type = count, n, tuple(size), cfg_type
        self.rows = torch.zeros((count, n, 3, *size), device=device, dtype=dtype)
        self.head = 0
        # the row order of each head position, laid out for the UNet (made once per layout)
        self._orders = [
            expand_for_unet(cfg_type, torch.tensor([(head - i) % n for i in range(n)])).to(device)
            for head in range(n)
        ]

    def push(self, conditions: Sequence[torch.Tensor | None]) -> None:
        """The newest frame's K conditions ``(1, 3, H, W)`` become slot 0's (``None``: that
        ControlNet is off; its row keeps what it had)."""
        self.head = (self.head + 1) % self.n
        for index, condition in enumerate(conditions):
            if condition is not None:
                self.rows[index, self.head].copy_(condition[0])

    def unet_images(self) -> torch.Tensor:
        """``(K, B, 3, H, W)``: every row's condition in UNet batch order."""
        return self.rows.index_select(1, self._orders[self.head])

    def resized(self, n: int, size: tuple[int, int], cfg_type: CfgType) -> ControlSlots:
        """New slots for another n, size or cfg layout, every slot holding the newest condition
        (resampled to ``size``); made by a plan, swapped in by its commit."""
        slots = ControlSlots(self.count, n, size, cfg_type, self.rows.device, self.rows.dtype)
        newest = self.rows[:, self.head]
        if tuple(newest.shape[-2:]) != tuple(size):
            newest = torch.nn.functional.interpolate(newest.float(), size=size, mode="bilinear").to(
                newest.dtype
            )
        slots.rows.copy_(newest.unsqueeze(1).expand_as(slots.rows))
        return slots
