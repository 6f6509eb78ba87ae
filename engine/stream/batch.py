"""The stream batch: latent buffer, cached per-slot noise, residual noise and one step per frame."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.stream.guidance import (
    expand_for_unet,
    guide,
    next_residual_noise,
    split_prediction,
    successor_coefficients,
    unet_batch_size,
)
from engine.stream.modes import CfgType, PredictionType
from engine.stream.schedule import StreamSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""The UNet seam: ``(latents (B, C, h, w), timesteps (B,) int64, embeddings (B, L, D))``
-> prediction ``(B, C, h, w)`` (ε or v, as the model predicts)."""


class StreamBatch:
    """n denoising slots advanced by one UNet call per frame (StreamDiffusion's Stream Batch).

    Slot 0 receives the newest frame's latent ``x = a_0 z + b_0 n_0``; slots 1..n−1 hold the
    buffer of partially denoised latents of earlier frames. One step predicts ``x0`` for all
    slots, emits the last slot's ``x0`` and re-noises the others one slot further:
    ``x_{i+1} = a_{i+1} x0_i + b_{i+1} n_{i+1}``. Latency is n − 1 frames; the first n − 1
    steps return ``None``.

    All tensors are allocated here when the schedule, noise or layout changes, never per frame.

    Args:
        schedule: per-slot constants (``StreamSchedule``), on the working device and dtype.
        noise: ``(n, C, h, w)`` cached per-slot noise, unit variance.
        cfg_type: guidance mode (decides the UNet batch layout).
        prediction_type: what the UNet predicts (ε or v).
        add_noise: re-noise the buffer with the cached noise (off: ``x_{i+1} = a_{i+1} x0_i``).
    """

    # per-frame constants, remade by ``_constants`` whenever the configuration changes
    _unet_timesteps: torch.Tensor
    _unet_alpha: torch.Tensor
    _unet_beta: torch.Tensor
    _scaled_noise: torch.Tensor
    _ratio_next: torch.Tensor
    _noise_next: torch.Tensor

    def __init__(
        self,
        schedule: StreamSchedule,
        noise: torch.Tensor,
        cfg_type: CfgType = CfgType.NONE,
        prediction_type: PredictionType = PredictionType.EPSILON,
        add_noise: bool = True,
        guidance_scale: float = 1.0,
        delta: float = 1.0,
    ) -> None:
        self._check_noise(schedule, noise)
        self.schedule = schedule
        self.noise = noise
        self.cfg_type = cfg_type
        self.prediction_type = prediction_type
        self.add_noise = add_noise
        self.guidance_scale = float(guidance_scale)
        self.delta = float(delta)
        self.latents = torch.zeros_like(noise)
        self.stock = noise.clone()
        self.steps_taken = 0
        self.last_output: torch.Tensor | None = None
        self._refresh_constants()

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Number of slots."""
        return self.schedule.n

    @property
    def unet_batch(self) -> int:
        """UNet batch per frame for the current cfg mode."""
        return unet_batch_size(self.cfg_type, self.n)

    @property
    def ready(self) -> bool:
        """True once the buffer is full and every step emits a finished frame."""
        return self.steps_taken >= self.n

    @property
    def uses_residual_noise(self) -> bool:
        """Self and onetime R-CFG keep the residual noise S."""
        return self.cfg_type in (CfgType.SELF, CfgType.ONETIME)

    # ------------------------------------------------------------------ changes
    def reset(self) -> None:
        """Empty the buffer; the next n − 1 steps warm up again."""
        self.latents.zero_()
        self.stock.copy_(self.noise)
        self.steps_taken = 0
        self.last_output = None

    def set_cfg_type(self, cfg_type: CfgType) -> None:
        """Switch guidance mode; the buffer is kept, S restarts from the cached noise."""
        self.reconfigure(cfg_type=cfg_type)

    def set_noise(self, noise: torch.Tensor) -> None:
        """New cached noise (seed change), effective on the next frame.

        Buffered latents are ``a_i x0_i + b_i n_i``; their noise part is swapped exactly for
        the new noise, so the very next output already carries the new seed.
        """
        self.reconfigure(noise=noise)

    def set_schedule(self, schedule: StreamSchedule, noise: torch.Tensor) -> None:
        """New t_index_list (and its noise), effective on the next frame.

        Same n: every buffered latent is re-expressed at its new timestep from its clean
        estimate ``x0_i = (x_i − b_i n_i) / a_i``. Different n: the new buffer is filled from
        the nearest old slot's estimate (or the last output), so output continues without a
        new warm-up once the stream was running. Noise of another latent size ``(h, w)`` (a
        resolution change) resamples those clean estimates bilinearly to the new size first.
        """
        self.reconfigure(schedule=schedule, noise=noise)

    def reconfigure(
        self,
        schedule: StreamSchedule | None = None,
        noise: torch.Tensor | None = None,
        cfg_type: CfgType | None = None,
    ) -> None:
        """Any of schedule, noise (seed or latent size) and cfg mode at once; all or nothing."""
        self.commit(self.plan(schedule, noise, cfg_type))

    def commit(self, plan: dict[str, object]) -> None:
        """Swap in what ``plan`` made: plain assignments, nothing that can fail."""
        for name, value in plan.items():
            setattr(self, name, value)

    def plan(
        self,
        schedule: StreamSchedule | None = None,
        noise: torch.Tensor | None = None,
        cfg_type: CfgType | None = None,
    ) -> dict[str, object]:
        """Every new tensor of a reconfiguration, made now; the batch itself is not changed.

        What can fail (out of memory when a resolution grows) fails here, before anything
        changed; ``commit`` then swaps the result in. ``None`` keeps the current value.
        """
        schedule = self.schedule if schedule is None else schedule
        noise = self.noise if noise is None else noise
        cfg_type = self.cfg_type if cfg_type is None else cfg_type
        self._check_noise(schedule, noise)
        changes: dict[str, object] = {}
        if schedule is not self.schedule or noise is not self.noise:  # a cfg-only change keeps the buffer
            same_layout = schedule.n == self.n and noise.shape[-2:] == self.noise.shape[-2:]
            changes = self._retimed(schedule, noise) if same_layout else self._resized(schedule, noise)
        if cfg_type is not self.cfg_type:
            changes["stock"] = noise.clone()
        changes.update(schedule=schedule, noise=noise, cfg_type=cfg_type)
        changes.update(self._constants(schedule, noise, cfg_type))
        return changes

    # ------------------------------------------------------------------ per frame
    def step(
        self, latent: torch.Tensor, denoise: Denoiser, embeddings: torch.Tensor
    ) -> torch.Tensor | None:
        """Advance every slot one step with ONE denoiser call.

        Args:
            latent: ``(1, C, h, w)`` slot-0 latent, already noised (see ``noised_input``).
            denoise: the UNet seam.
            embeddings: ``(unet_batch, L, D)`` prompt embeddings laid out for the cfg mode.

        Returns:
            ``(1, C, h, w)`` the finished latent ``x0`` of the oldest slot, or ``None`` while
            the buffer is still filling.
        """
        s = self.schedule
        n = self.n
        # 1. slot 0 takes the new latent; slots 1..n-1 already hold the buffer
        self.latents[:1].copy_(latent)
        x = self.latents
        # 2. residual noise of slot 0 is its own cached noise (self-negative R-CFG)
        if self.uses_residual_noise:
            self.stock[:1].copy_(self.noise[:1])
        # 3. one UNet call on the whole stream batch
        raw = denoise(expand_for_unet(self.cfg_type, x), self._unet_timesteps, embeddings)
        eps_all = self._to_epsilon(raw)
        eps_cond, eps_uncond = split_prediction(self.cfg_type, eps_all, n)
        # 4. guidance: full uses the unconditional half, R-CFG uses δ·S
        if self.cfg_type is CfgType.ONETIME:
            assert eps_uncond is not None
            self.stock[:1].copy_(eps_uncond)
        if self.uses_residual_noise:
            eps_uncond = self.delta * self.stock
        eps = guide(eps_cond, eps_uncond, self.guidance_scale)
        # 5. batched LCM step: x0 for every slot
        x0 = s.c_out * (x - s.beta * eps) / s.alpha + s.c_skip * x
        # 6. residual noise carried to the next slot (before x is overwritten)
        if self.uses_residual_noise and n > 1:
            successor = next_residual_noise(
                self.stock,
                x,
                x0,
                s.alpha,
                s.beta,
                self._ratio_next,
                self._noise_next if self.add_noise else None,
            )
            self.stock[1:].copy_(successor[:-1])
        # 7. re-noise slots 0..n-2 into the buffer for slots 1..n-1
        if n > 1:
            if self.add_noise:
                torch.addcmul(self._scaled_noise[1:], s.alpha[1:], x0[:-1], out=self.latents[1:])
            else:
                torch.mul(s.alpha[1:], x0[:-1], out=self.latents[1:])
        self.steps_taken += 1
        output = x0[-1:]
        self.last_output = output
        return output if self.ready else None

    def unet_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What one UNet call of this batch takes now: latents ``(unet_batch, C, h, w)`` and
        timesteps ``(unet_batch,)`` (the bench's floor times exactly this call)."""
        return expand_for_unet(self.cfg_type, self.latents), self._unet_timesteps

    def noised_input(self, z: torch.Tensor) -> torch.Tensor:
        """Slot-0 latent ``a_0 z + b_0 n_0`` for an encoded frame ``z`` ``(1, C, h, w)``."""
        return torch.addcmul(self._scaled_noise[:1], self.schedule.alpha[:1], z)

    # ------------------------------------------------------------------ internals
    def _to_epsilon(self, prediction: torch.Tensor) -> torch.Tensor:
        """v-prediction → ε with ``ε = a v + b x`` per slot (rows follow the UNet layout)."""
        if self.prediction_type is PredictionType.EPSILON:
            return prediction
        x = expand_for_unet(self.cfg_type, self.latents)
        return self._unet_alpha * prediction + self._unet_beta * x

    def _refresh_constants(self) -> None:
        """Recompute what a step reuses every frame (after any schedule/noise/mode change)."""
        for name, value in self._constants(self.schedule, self.noise, self.cfg_type).items():
            setattr(self, name, value)

    @staticmethod
    def _constants(
        schedule: StreamSchedule, noise: torch.Tensor, cfg_type: CfgType
    ) -> dict[str, torch.Tensor]:
        """The per-frame constants of a configuration (new tensors; nothing is changed)."""
        ratio_next, noise_next = successor_coefficients(schedule.alpha, schedule.beta, noise)
        return {
            "_unet_timesteps": expand_for_unet(cfg_type, schedule.timesteps).contiguous(),
            "_unet_alpha": expand_for_unet(cfg_type, schedule.alpha).contiguous(),
            "_unet_beta": expand_for_unet(cfg_type, schedule.beta).contiguous(),
            "_scaled_noise": schedule.beta * noise,
            "_ratio_next": ratio_next,
            "_noise_next": noise_next,
        }

    def _clean_estimates(self) -> torch.Tensor:
        """``x0`` estimates of buffered slots ``(n, C, h, w)`` (slot 0's row is unused)."""
        s = self.schedule
        noisy = self.latents - s.beta * self.noise if self.add_noise else self.latents
        return noisy / s.alpha

    def _references(self) -> torch.Tensor:
        """R-CFG reference latents ``r_i = (x_i − b_i S_i) / a_i`` of buffered slots."""
        s = self.schedule
        return (self.latents - s.beta * self.stock) / s.alpha

    def _retimed(self, schedule: StreamSchedule, noise: torch.Tensor) -> dict[str, object]:
        """Buffer of the same n and size re-expressed at new timesteps / noise (new tensors)."""
        if self.steps_taken == 0:
            return {}
        x0, ref = self._clean_estimates(), self._references()
        retimed = schedule.alpha * x0 + (schedule.beta * noise if self.add_noise else 0.0)
        latents, stock = self.latents.clone(), self.stock.clone()
        stock[1:] = ((retimed - schedule.alpha * ref) / schedule.beta)[1:]
        latents[1:] = retimed[1:]
        return {"latents": latents, "stock": stock}

    def _resized(self, schedule: StreamSchedule, noise: torch.Tensor) -> dict[str, object]:
        """Buffer for another n or latent size, filled from the old slots' clean estimates.

        Only a full (warmed-up) buffer is carried over; during the warm-up its empty slots hold
        nothing worth showing, so the warm-up starts again.
        """
        old_n = self.n
        size = tuple(noise.shape[-2:])
        latents, stock = torch.zeros_like(noise), noise.clone()
        last_output = None if self.last_output is None else _resample(self.last_output, size)
        if not self.ready:
            return {"latents": latents, "stock": stock, "last_output": last_output, "steps_taken": 0}
        x0, ref = _resample(self._clean_estimates(), size), _resample(self._references(), size)
        for slot in range(1, schedule.n):
            if old_n > 1:
                source = min(slot, old_n - 1)
                clean, reference = x0[source], ref[source]
            else:
                assert last_output is not None
                clean = reference = last_output[0]
            a, b = schedule.alpha[slot], schedule.beta[slot]
            latents[slot] = a * clean + (b * noise[slot] if self.add_noise else 0.0)
            stock[slot] = (latents[slot] - a * reference) / b
        return {"latents": latents, "stock": stock, "last_output": last_output, "steps_taken": schedule.n}

    @staticmethod
    def _check_noise(schedule: StreamSchedule, noise: torch.Tensor) -> None:
        if noise.ndim != 4 or noise.shape[0] != schedule.n:
            raise ValueError(
                f"noise of shape {tuple(noise.shape)} does not fit {schedule.n} slots; "
                f"expected ({schedule.n}, C, h, w)"
            )


def _resample(latents: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``(N, C, h, w)`` latents at another ``(h', w')`` (bilinear, antialiased when shrinking)."""
    if tuple(latents.shape[-2:]) == size:
        return latents
    shrinking = size[0] < latents.shape[-2] or size[1] < latents.shape[-1]
    resized = torch.nn.functional.interpolate(
        latents.float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking
    )
    return resized.to(latents.dtype)
