"""The loaded model parts a StreamPipeline needs, with the facts read from their configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.models.kinds import ModelFamily
from engine.stream.modes import PredictionType
from engine.stream.schedule import StreamSchedule, build_schedule

if TYPE_CHECKING:
    from engine.models.lora import LoraFactors


@dataclass
class ModelBundle:
    """Everything the pipeline runs, already on its device and in its dtype.

    Attributes:
        unet: a diffusers ``UNet2DConditionModel`` (or anything with the same call).
        vae: ``AutoencoderTiny`` (TAESD) or ``AutoencoderKL``; ``encode``/``decode`` as diffusers.
        text_encoder: ``CLIPTextModel``; ``text_encoder(ids)[0]`` is ``(B, 77, D)``.
        tokenizer: ``CLIPTokenizer`` with ``model_max_length`` 77.
        alphas_cumprod: ``(num_train_timesteps,)`` float32 on CPU, from the scheduler config.
        prediction_type: epsilon or v_prediction.
        vae_scale_factor: image pixels per latent pixel (8 for SD).
        latent_channels: channels of the latent (4 for SD).
        vae_scaling_factor: multiply encoder latents by this (1.0 for TAESD, 0.18215 for SD VAE).
        source: a human-readable name of where the weights came from.
        identity: facts that identify the weights (for cache keys), e.g. model id, LoRAs.
        scheduler_config: the model's scheduler config as loaded (for peers in the bench).
        lora_factors: low-rank factors of each fused ``model.loras`` entry, in config order
            (not the LCM-LoRA), for live rescaling (``engine.models.lora.rescale_loras``).
        lora_scales: the scale each of those is fused at now.
        controlnets: the ``model.controlnets`` ControlNets (diffusers ``ControlNetModel``), in
            config order, on the device and dtype; their identities in ``identity["controlnets"]``.
        ip_adapter: the IP-Adapter (``engine.models.ip_adapter.IpAdapter``) or None.
        family: SD (one text encoder) or SDXL (with ``text_encoder_2``/``tokenizer_2``).
        text_encoder_2: SDXL's ``CLIPTextModelWithProjection`` (pooled ``text_embeds`` of
            ``projection_dim``), else None.
        tokenizer_2: its tokenizer, else None.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    alphas_cumprod: torch.Tensor
    prediction_type: PredictionType
    device: torch.device
    dtype: torch.dtype
    vae_scale_factor: int = 8
    latent_channels: int = 4
    vae_scaling_factor: float = 1.0
    num_train_timesteps: int = 1000
    original_inference_steps: int = 50
    source: str = ""
    identity: dict[str, Any] = field(default_factory=dict)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    lora_factors: list[LoraFactors] = field(default_factory=list)
    lora_scales: list[float] = field(default_factory=list)
    controlnets: list[Any] = field(default_factory=list)
    ip_adapter: Any = None
    family: ModelFamily = ModelFamily.SD
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def pooled_dim(self) -> int:
        """P of SDXL's pooled text embeddings (``text_embeds (B, P)``); 0 for SD."""
        if self.family is not ModelFamily.SDXL:
            return 0
        return int(self.text_encoder_2.config.projection_dim)

    @property
    def ip_tokens(self) -> int:
        """IP-Adapter image tokens appended to the text embeddings (0: no IP-Adapter)."""
        return 0 if self.ip_adapter is None else int(self.ip_adapter.num_tokens)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """Latent ``(C, h, w)`` of a ``width`` x ``height`` frame; ``ParamError`` if it does not divide."""
        from engine.params import ParamError

        factor = self.vae_scale_factor
        if width % factor or height % factor:
            raise ParamError(
                "resolution",
                f"{width}x{height} does not divide into this model's {factor}x{factor} latent pixels; "
                f"allowed: multiples of {factor}",
            )
        return (self.latent_channels, height // factor, width // factor)

    def check_t_index_list(self, t_index_list: list[int], num_inference_steps: int) -> None:
        """``ParamError`` when an index of ``t_index_list`` is ``num_inference_steps`` or more."""
        from engine.params import ParamError

        steps = num_inference_steps
        if max(t_index_list) >= steps:
            raise ParamError(
                "t_index_list",
                f"{t_index_list} has an index >= num_inference_steps ({steps}); "
                f"allowed: strictly increasing integers in [0, {steps - 1}]",
            )

    def schedule(self, t_index_list: list[int], num_inference_steps: int) -> StreamSchedule:
        """The stream schedule of these weights' scheduler for ``t_index_list`` of
        ``num_inference_steps`` (``ParamError``: see ``check_t_index_list``)."""
        self.check_t_index_list(t_index_list, num_inference_steps)
        return build_schedule(
            self.alphas_cumprod,
            t_index_list,
            num_inference_steps=num_inference_steps,
            original_inference_steps=max(num_inference_steps, self.original_inference_steps),
            device=self.device,
            dtype=self.dtype,
        )
