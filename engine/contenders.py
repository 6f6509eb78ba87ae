"""What the bench runs beside latentstage: the floor, diffusers' img2img and the paper's StreamDiffusion."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any
from unittest import mock

import torch

from engine.extensions.sdxl import sdxl_inputs
from engine.models.assemble import sd_pipeline_parts
from engine.models.bundle import ModelBundle
from engine.models.kinds import ModelFamily
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.stream.modes import CfgType

Step = Callable[[torch.Tensor], object]
"""One frame of a contender: takes ``(1, 3, H, W)`` on the model's device and dtype, in the
contender's own range (see ``Contender.unit_range``)."""

STREAMDIFFUSION_INSTALL = "pip install --no-deps streamdiffusion==0.1.1"
"""Its wheel pins diffusers==0.24.0, which this project cannot use, hence ``--no-deps``."""


class _NoCustomScheduleNotice(logging.Filter):
    """Drops diffusers' LCM notice that a custom schedule starts below t = 999: the img2img
    contender starts at latentstage's first timestep on purpose (one notice per frame)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "on the custom timestep schedule" not in record.getMessage()


_CUSTOM_SCHEDULE_NOTICE = _NoCustomScheduleNotice()


class Peer(str, Enum):
    """The tools users would pick instead, by their ``--compare`` names."""

    DIFFUSERS = "diffusers"
    STREAMDIFFUSION = "streamdiffusion"


PEER_CFG = {
    CfgType.NONE: "none",
    CfgType.FULL: "full",
    CfgType.SELF: "self",
    CfgType.ONETIME: "initialize",
}
"""Our cfg modes by the paper's code's names (its ``initialize`` is our ``onetime``)."""


@dataclass(frozen=True)
class Contender:
    """One configuration timed side by side with the others.

    Attributes:
        key: a stable name for the JSON (``latentstage``, ``floor``, ``diffusers`` ...).
        label: the table's row name.
        step: runs one frame.
        unit_range: the step takes images in [0, 1] (diffusers, the paper's code) instead of [-1, 1].
    """

    key: str
    label: str
    step: Step
    unit_range: bool = False


def uses_taesd(models: ModelBundle) -> bool:
    """Whether the bundle's VAE is TAESD (``AutoencoderTiny``) rather than the full VAE."""
    from diffusers import AutoencoderTiny

    return isinstance(models.vae, AutoencoderTiny)


def latentstage(pipe: StreamPipeline) -> Contender:
    return Contender("latentstage", "latentstage", pipe)


def floor(pipe: StreamPipeline) -> Contender:
    """One UNet call of the frame's stream batch + one VAE encode + one decode, nothing else.

    The least any StreamDiffusion frame can cost with these models; latentstage's frame time
    divided by this is its overhead (the stream math, guidance, noise and copies).
    """
    latents, timesteps, embeddings = pipe.unet_inputs()
    latents, timesteps, embeddings = latents.clone(), timesteps.clone(), embeddings.clone()
    unet, vae = pipe.runners.unet, pipe.runners.vae
    added = sdxl_inputs(pipe)  # SDXL's text_embeds and time_ids (None for SD)

    @torch.inference_mode()
    def step(frame: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(frame)
        prediction = unet(latents, timesteps, embeddings, added)
        return vae.decode(latent + prediction[:1])

    vae_name = "TAESD" if uses_taesd(pipe.models) else "VAE"
    batch = pipe.unet_batch_size
    return Contender("floor", f"floor: UNet b={batch} + {vae_name} enc+dec", step)


def _sd_components(models: ModelBundle, vae: Any) -> dict[str, Any]:
    parts = (models.unet, vae, models.text_encoder, models.tokenizer, models.scheduler_config)
    return sd_pipeline_parts(*parts, models.family, models.text_encoder_2, models.tokenizer_2)


def diffusers_img2img(
    models: ModelBundle, vae: Any, settings: PipelineSettings, timesteps: list[int], key: str, label: str
) -> Contender:
    """diffusers' ``StableDiffusionImg2ImgPipeline`` (SDXL: ``StableDiffusionXLImg2ImgPipeline``)
    on the same weights, steps and size.

    Called as a user would: the prompt is encoded on every call, the image is encoded and the
    result decoded by ``vae``; the timesteps are exactly latentstage's (``timesteps`` with
    strength 1, so the input is noised to the first one). It has no residual CFG: whenever
    latentstage guides (cfg_type not none and γ > 1) it gets the same γ, which is full CFG
    (batch 2 per step). Its output stays a tensor on the device (``output_type="pt"``).
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    logging.getLogger("diffusers.schedulers.scheduling_lcm").addFilter(_CUSTOM_SCHEDULE_NOTICE)
    img2img = (
        StableDiffusionXLImg2ImgPipeline
        if models.family is ModelFamily.SDXL
        else StableDiffusionImg2ImgPipeline
    )
    pipe: Any = img2img(**_sd_components(models, vae))
    pipe.set_progress_bar_config(disable=True)
    guides = settings.cfg_type is not CfgType.NONE and settings.guidance_scale > 1.0
    guidance = float(settings.guidance_scale) if guides else 1.0
    negative = settings.negative_prompt if guides else None

    def step(frame: torch.Tensor) -> object:
        return pipe(
            prompt=settings.prompt,
            negative_prompt=negative,
            image=frame,
            strength=1.0,
            timesteps=timesteps,
            guidance_scale=guidance,
            output_type="pt",
        ).images

    return Contender(key, label, step, unit_range=True)


def diffusers_pair(
    models: ModelBundle, full_vae: Any, taesd: Any, settings: PipelineSettings, pipe: StreamPipeline
) -> list[Contender]:
    """diffusers' img2img at its defaults (full VAE) and with TAESD, on ``pipe``'s timesteps."""
    timesteps = [int(t) for t in pipe.batch.schedule.timesteps.tolist()]
    return [
        diffusers_img2img(models, full_vae, settings, timesteps, "diffusers", "diffusers img2img (defaults)"),
        diffusers_img2img(models, taesd, settings, timesteps, "diffusers_taesd", "diffusers img2img + TAESD"),
    ]


def streamdiffusion_unavailable(models: ModelBundle | None = None) -> str | None:
    """Why the paper's code cannot run here (``None`` when ``import streamdiffusion`` works)."""
    if models is not None and models.family is ModelFamily.SDXL:
        return "the paper's code does not run SDXL (it crashes there: its issue #20)"
    try:
        importlib.import_module("streamdiffusion")
    except ImportError as err:
        return f"streamdiffusion is not installed ({err}); {STREAMDIFFUSION_INSTALL}"
    return None


class _HostEvent:
    """Stands in for ``torch.cuda.Event`` on a CPU-only torch (host clock, same two calls)."""

    def __init__(self, enable_timing: bool = False) -> None:
        self._at = 0.0

    def record(self, stream: object = None) -> None:
        self._at = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return 1000.0 * (end._at - self._at)


@contextlib.contextmanager
def _host_cuda_timing(device: torch.device) -> Iterator[None]:
    """The paper's ``__call__`` times itself with CUDA events and syncs on every frame; off
    CUDA those raise, so only around its call they are replaced by the host clock."""
    if device.type == "cuda":
        yield
        return
    with (
        mock.patch.object(torch.cuda, "Event", _HostEvent),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
    ):
        yield


def streamdiffusion(models: ModelBundle, settings: PipelineSettings) -> Contender:
    """The paper's ``StreamDiffusion`` class on the same models, t_index_list, cfg mode and VAE.

    Built as its README does: a ``StableDiffusionPipeline`` from the parts (with latentstage's
    VAE, TAESD by default, which its README sets as ``stream.vae``), then ``prepare`` with the
    same prompt, negative prompt, γ, δ and seed (its noise is drawn from the seed as ours is).

    Raises:
        ImportError: the package is missing (``streamdiffusion_unavailable`` says how to add it).
    """
    from diffusers import StableDiffusionPipeline

    module: Any = importlib.import_module("streamdiffusion")
    pipe = StableDiffusionPipeline(**_sd_components(models, models.vae))
    stream = module.StreamDiffusion(
        pipe,
        t_index_list=list(settings.t_index_list),
        torch_dtype=models.dtype,
        width=settings.width,
        height=settings.height,
        cfg_type=PEER_CFG[CfgType(settings.cfg_type)],
    )
    stream.prepare(
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        delta=settings.delta,
        seed=settings.seed,
    )

    def step(frame: torch.Tensor) -> object:
        with _host_cuda_timing(models.device):
            return stream(frame)

    version = importlib.metadata.version("streamdiffusion")
    return Contender("streamdiffusion", f"paper's code (streamdiffusion {version})", step, unit_range=True)
