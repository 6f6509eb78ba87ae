"""StreamPipeline: encode → stream step → decode; owns the caches; applies live changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import params
from engine.accel.backends import Backend
from engine.accel.base import UNetRunner, UNetShape, VaeRunner, VaeShape
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.models.bundle import ModelBundle
from engine.models.lora import LoraFactors, rescale_loras, touched_parameters
from engine.params import ParamError
from engine.prompting import PromptEncoder
from engine.stream.attention import CrossFrameAttnProcessor
from engine.stream.batch import StreamBatch
from engine.stream.blend import blend_noise, slerp
from engine.stream.guidance import batch_groups_for, layout_embeddings, unet_batch_size
from engine.stream.modes import BlendMethod, CfgType, GenerationMode
from engine.stream.schedule import StreamSchedule, build_schedule, strength_to_t_index_list
from engine.stream.similarity import SimilarityFilter

logger = logging.getLogger(__name__)

PIPELINE_PARAMS: tuple[str, ...] = (
    "prompt",
    "negative_prompt",
    "prompt_blend",
    "prompt_blend_method",
    "guidance_scale",
    "delta",
    "cfg_type",
    "seed",
    "seed_blend",
    "t_index_list",
    "strength",
    "lora_scales",
    "resolution",
    "similarity_filter_enabled",
    "similarity_filter_threshold",
    "similarity_filter_max_skip_frames",
)
"""Live parameters ``StreamPipeline.apply`` accepts (names from ``engine.params``)."""


class NeedsEngine(Exception):
    """A change needs runners of another shape that the backend has not built yet.

    Raised by ``apply`` before anything changed; the runtime prepares ``shape`` (and
    ``vae_shape`` when the resolution changes) off the frame loop — the current configuration
    keeps running — and applies the change when they are ready.
    """

    def __init__(self, shape: UNetShape, vae_shape: VaeShape | None = None) -> None:
        super().__init__(f"no engine yet for UNet {build_label(shape, vae_shape)} ({shape})")
        self.shape = shape
        self.vae_shape = vae_shape

    @property
    def label(self) -> str:
        """A short name for logs: ``batch 3`` or ``batch 2 at 768x512``."""
        return build_label(self.shape, self.vae_shape)


def build_label(shape: UNetShape, vae_shape: VaeShape | None) -> str:
    """``batch 3`` or ``batch 2 at 768x512``: what is being built, for logs and the status."""
    if vae_shape is None:
        return f"batch {shape.batch}"
    return f"batch {shape.batch} at {vae_shape.width}x{vae_shape.height}"


@dataclass
class PipelineSettings:
    """Start-up settings of a StreamPipeline (the ``stream`` and ``similarity_filter`` config)."""

    width: int = 512
    height: int = 512
    mode: GenerationMode = GenerationMode.IMG2IMG
    t_index_list: list[int] = field(default_factory=lambda: [32, 45])
    num_inference_steps: int = 50
    cfg_type: CfgType = CfgType.SELF
    guidance_scale: float = 1.2
    delta: float = 1.0
    prompt: str = ""
    negative_prompt: str = ""
    prompt_blend_method: BlendMethod = BlendMethod.SLERP
    seed: int = 2
    add_noise: bool = True
    cross_frame_attention: bool = False
    similarity_filter_enabled: bool = False
    similarity_filter_threshold: float = 0.98
    similarity_filter_max_skip_frames: int = 10

    @classmethod
    def from_config(cls, config: Any) -> PipelineSettings:
        """Read ``config.stream`` and ``config.similarity_filter`` (the validated schema)."""
        stream, ssf = config.stream, config.similarity_filter
        return cls(
            width=stream.width,
            height=stream.height,
            mode=GenerationMode(stream.mode),
            t_index_list=list(stream.t_index_list),
            num_inference_steps=stream.num_inference_steps,
            cfg_type=CfgType(stream.cfg_type),
            guidance_scale=stream.guidance_scale,
            delta=stream.delta,
            prompt=stream.prompt,
            negative_prompt=stream.negative_prompt,
            prompt_blend_method=BlendMethod(stream.prompt_blend_method),
            seed=stream.seed,
            add_noise=stream.add_noise,
            cross_frame_attention=stream.cross_frame_attention,
            similarity_filter_enabled=ssf.enabled,
            similarity_filter_threshold=ssf.threshold,
            similarity_filter_max_skip_frames=ssf.max_skip_frames,
        )


@dataclass
class PipelineStats:
    """Counters since start (plain ints; read by the runtime's status thread)."""

    frames_in: int = 0
    frames_out: int = 0
    skipped: int = 0
    unet_calls: int = 0
    vae_encodes: int = 0
    vae_decodes: int = 0


class StreamPipeline:
    """Real-time img2img / txt2img on a stream of frames (StreamDiffusion).

    ``pipeline(image)`` takes one frame ``(1, 3, H, W)`` in [-1, 1] (``None`` in txt2img mode)
    and returns the finished frame of the same shape, or ``None`` while the stream batch is
    still filling (the first n − 1 frames). Live changes go through ``apply`` between frames.

    Args:
        models: loaded model parts (``engine.models``), on their device and dtype.
        settings: start-up values of every live parameter and the fixed ones (size, mode).
        unet_runner, vae_runner: backend seam (``engine.accel``); torch eager by default.
    """

    def __init__(
        self,
        models: ModelBundle,
        settings: PipelineSettings | None = None,
        unet_runner: UNetRunner | None = None,
        vae_runner: VaeRunner | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.models = models
        self.settings = settings = settings or PipelineSettings()
        self._check_settings(settings)
        self.device, self.dtype = models.device, models.dtype
        self.height, self.width = settings.height, settings.width
        self.latent_shape = self.latent_shape_for(settings.width, settings.height)
        self.mode = settings.mode
        self.unet_runner: UNetRunner = unet_runner or TorchUNet(models.unet)
        self.vae_runner: VaeRunner = vae_runner or TorchVae(models.vae, models.vae_scaling_factor)
        self.prompts = PromptEncoder(models.text_encoder, models.tokenizer, self.device, self.dtype)
        self.stats = PipelineStats()
        self.last_output: torch.Tensor | None = None

        self._configured_lora_scales = list(models.lora_scales)
        self.state: dict[str, Any] = {
            "prompt": settings.prompt,
            "negative_prompt": settings.negative_prompt,
            "prompt_blend": None,
            "prompt_blend_method": BlendMethod(settings.prompt_blend_method).value,
            "guidance_scale": float(settings.guidance_scale),
            "delta": float(settings.delta),
            "cfg_type": CfgType(settings.cfg_type).value,
            "seed": int(settings.seed),
            "seed_blend": None,
            "t_index_list": list(settings.t_index_list),
            "strength": None,
            "lora_scales": list(models.lora_scales) if models.lora_factors else None,
            "resolution": [int(settings.width), int(settings.height)],
            "similarity_filter_enabled": bool(settings.similarity_filter_enabled),
            "similarity_filter_threshold": float(settings.similarity_filter_threshold),
            "similarity_filter_max_skip_frames": int(settings.similarity_filter_max_skip_frames),
        }
        self.similarity_filter = SimilarityFilter(
            settings.similarity_filter_threshold,
            settings.similarity_filter_max_skip_frames,
            seed=settings.seed,
        )
        cfg_type = CfgType(settings.cfg_type)
        schedule = self._schedule(self.state["t_index_list"])
        self.batch = StreamBatch(
            schedule,
            self._noise(self.state, schedule.n),
            cfg_type=cfg_type,
            prediction_type=models.prediction_type,
            add_noise=settings.add_noise,
            guidance_scale=settings.guidance_scale,
            delta=settings.delta,
        )
        self._positive, self._negative = self._prompt_embeddings(self.state)
        self._embeddings = layout_embeddings(cfg_type, schedule.n, self._positive, self._negative)
        self._transition: tuple[torch.Tensor, float] | None = None
        self._cross_frame: CrossFrameAttnProcessor | None = None
        if settings.cross_frame_attention:
            self._install_cross_frame_attention()
        self.backend = backend
        if backend is not None:
            self.vae_runner = backend.prepare_vae(self.vae_shape())
            self.unet_runner = backend.prepare_unet(self.unet_shape())

    # ------------------------------------------------------------------ per frame
    @torch.inference_mode()
    def __call__(self, image: torch.Tensor | None = None) -> torch.Tensor | None:
        """Process one frame; see the class docstring for shapes."""
        self.stats.frames_in += 1
        # 1. check the input and take the slot-0 latent
        if self.mode is GenerationMode.TXT2IMG:
            latent = self.batch.noise[:1]
        else:
            self._check_image(image)
            assert image is not None
            image = image.to(device=self.device, dtype=self.dtype)
            # 2. similarity filter: a skipped frame re-emits the previous output, no VAE/UNet
            if self.state["similarity_filter_enabled"]:
                if self.last_output is None:
                    self.similarity_filter.mark_processed(image)
                elif self.similarity_filter.should_skip(image):
                    self.stats.skipped += 1
                    return self.last_output
            # 3. VAE encode, then noise slot 0 with its cached noise
            self.stats.vae_encodes += 1
            latent = self.batch.noised_input(self.vae_runner.encode(image))
        # 4. one UNet call on the stream batch + batched LCM step
        self.stats.unet_calls += 1
        x0 = self.batch.step(latent, self.unet_runner, self._embeddings)
        if x0 is None:
            return None
        # 5. decode the finished (oldest) slot
        self.stats.vae_decodes += 1
        output = self.vae_runner.decode(x0).clamp_(-1.0, 1.0)
        self.stats.frames_out += 1
        self.last_output = output
        return output

    # ------------------------------------------------------------------ live changes
    def apply(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Apply live parameter changes at a frame boundary; all or nothing.

        Every value is validated (``engine.params``) and everything that can fail is prepared
        before any state changes, so a refused change leaves the pipeline exactly as it was.
        Prompt embeddings are encoded only when the prompt text changes.

        Returns:
            The accepted changes in canonical form (what a control surface should echo).

        Raises:
            ParamError: naming the parameter, the bad value and what is allowed.
        """
        accepted = params.validate_changes(changes, PIPELINE_PARAMS)
        if not accepted:
            return {}
        new_state = dict(self.state)
        new_state.update(accepted)
        # /prompt and /seed go back to a single prompt / seed
        if "prompt" in accepted and "prompt_blend" not in accepted:
            new_state["prompt_blend"] = None
        if "seed" in accepted and "seed_blend" not in accepted:
            new_state["seed_blend"] = None
        if "t_index_list" in accepted and accepted.get("strength") is not None:
            raise ParamError("strength", "give t_index_list or strength in one change, not both")
        if accepted.get("strength") is not None:
            new_state["t_index_list"] = strength_to_t_index_list(
                accepted["strength"], self.batch.n, self.settings.num_inference_steps
            )
        elif "t_index_list" in accepted:
            new_state["strength"] = None
        lora_plan = "none"
        if "lora_scales" in accepted:
            new_state["lora_scales"] = accepted["lora_scales"] = self._check_lora_scales(
                accepted["lora_scales"]
            )
            lora_plan = self._lora_plan(self.state["lora_scales"], new_state["lora_scales"])

        # prepare (may raise; nothing is changed yet)
        cfg_type = CfgType(new_state["cfg_type"])
        width, height = new_state["resolution"]
        size_changed = (width, height) != (self.width, self.height)
        latent_shape = self.latent_shape_for(width, height) if size_changed else self.latent_shape
        schedule_changed = new_state["t_index_list"] != self.state["t_index_list"]
        schedule = self._schedule(new_state["t_index_list"]) if schedule_changed else self.batch.schedule
        n = schedule.n
        noise_keys = ("seed", "seed_blend", "prompt_blend_method")
        noise_changed = (
            schedule_changed or size_changed or any(new_state[k] != self.state[k] for k in noise_keys)
        )
        noise = self._noise(new_state, n, latent_shape) if noise_changed else self.batch.noise
        prompt_keys = ("prompt", "negative_prompt", "prompt_blend", "prompt_blend_method")
        prompt_changed = any(new_state[k] != self.state[k] for k in prompt_keys)
        positive, negative = (
            self._prompt_embeddings(new_state) if prompt_changed else (self._positive, self._negative)
        )
        shape_changed = n != self.batch.n or cfg_type is not self.batch.cfg_type or size_changed
        runner, vae_runner = self.unet_runner, self.vae_runner
        old_shapes = (self.unet_shape(), self.vae_shape())
        new_shapes = (self.unet_shape(n, cfg_type, latent_shape), self.vae_shape(width, height))
        if shape_changed and self.backend is not None:
            ready = self.backend.unet_for(new_shapes[0])
            ready_vae = self.backend.vae_for(new_shapes[1]) if size_changed else vae_runner
            if ready is None or ready_vae is None:
                raise NeedsEngine(new_shapes[0], new_shapes[1] if size_changed else None)
            runner, vae_runner = ready, ready_vae
        elif size_changed and not (isinstance(runner, TorchUNet) and isinstance(vae_runner, TorchVae)):
            raise ParamError(
                "resolution",
                f"this pipeline's runners are fixed to {self.width}x{self.height} and it has no "
                "backend to build others; allowed: the current size",
            )
        layout_changed = prompt_changed or shape_changed
        embeddings = (
            layout_embeddings(cfg_type, n, positive, negative) if layout_changed else self._embeddings
        )

        # the new stream-batch tensors (the big allocations of a resolution change) are made
        # here, so running out of memory refuses the change instead of half-applying it
        batch_plan = (
            self.batch.plan(schedule, noise, cfg_type)
            if noise_changed or cfg_type is not self.batch.cfg_type  # noise follows the schedule
            else {}
        )

        if lora_plan == "refit":  # last prepare step: the engines change, the torch UNet not yet
            self._refit_engines(self.state["lora_scales"], new_state["lora_scales"])

        # commit
        if lora_plan in ("torch", "refit"):
            positive, negative, embeddings = self._rescale_loras(
                new_state, cfg_type, n, (positive, negative, embeddings)
            )
        self.unet_runner, self.vae_runner = runner, vae_runner
        if size_changed:
            self.width, self.height, self.latent_shape = width, height, latent_shape
            self.similarity_filter.reset()
            self.last_output = None
        self.batch.commit(batch_plan)
        self.batch.guidance_scale = new_state["guidance_scale"]
        self.batch.delta = new_state["delta"]
        if layout_changed:
            self._transition = None
        self._positive, self._negative, self._embeddings = positive, negative, embeddings
        self.similarity_filter.configure(
            new_state["similarity_filter_threshold"],
            new_state["similarity_filter_max_skip_frames"],
        )
        if not new_state["similarity_filter_enabled"]:
            self.similarity_filter.reset()
        self.state = new_state
        if self._cross_frame is not None:
            self._cross_frame.groups = self._attention_groups()
        if shape_changed and self.backend is not None:
            # keep the previous shapes loaded for a quick way back; release everything older
            self.backend.retain({old_shapes[0], new_shapes[0]}, {old_shapes[1], new_shapes[1]})
        logger.debug("applied %s", sorted(accepted))
        return accepted

    # ------------------------------------------------------------------ LoRA scales
    def _check_lora_scales(self, scales: list[float] | None) -> list[float] | None:
        factors = self.models.lora_factors
        if scales is None and not factors:
            return None  # "the configured scales" of no LoRAs (e.g. a scene): nothing to do
        if not factors:
            raise ParamError(
                "lora_scales", "no model.loras are configured: there is nothing to scale"
            )
        if scales is None:
            return list(self._configured_lora_scales)
        if len(scales) != len(factors):
            raise ParamError(
                "lora_scales",
                f"{len(scales)} scales given; allowed: exactly {len(factors)} "
                f"(one per model.loras entry, in config order)",
            )
        unsupported = [name for f in factors for name in f.unsupported]
        if unsupported:
            raise ParamError(
                "lora_scales",
                f"these LoRA layers cannot be rescaled live (DoRA or embeddings): {unsupported[:4]}; "
                "set the scales in model.loras and restart",
            )
        return list(scales)

    def _lora_plan(self, old: list[float] | None, new: list[float] | None) -> str:
        if old is None or new is None or old == new:
            return "none"
        plan = "torch" if self.backend is None else self.backend.lora_update_plan(old, new)
        if plan == "rebuild":
            raise ParamError(
                "lora_scales",
                "this TensorRT engine was not built refittable (acceleration.refittable: false): "
                "a rebuild is needed — run `latentstage build` with the new scales in model.loras, "
                "or set acceleration.refittable: true",
            )
        if plan == "busy":
            raise ParamError(
                "lora_scales",
                "engines are being built for a shape change from the current weights; send the "
                "scales again when /engine/building is empty",
            )
        if plan == "reexport":
            raise ParamError(
                "lora_scales",
                f"the {self.backend.name if self.backend else ''} backend has the LoRA weights baked "
                "into its exported graphs: a re-export is needed — set the scales in model.loras "
                "and restart",
            )
        return plan

    def _refit_engines(self, old: list[float], new: list[float]) -> None:
        """Refit the backend's engines with the UNet weights at the new scales (torch unchanged)."""
        factors: list[LoraFactors] = self.models.lora_factors
        current = dict(self.models.unet.named_parameters())
        weights = {}
        with torch.no_grad():
            for name in touched_parameters(factors):
                module_name = name.removesuffix(".weight")
                value = current[name].float()
                for lora, a, b in zip(factors, old, new, strict=True):
                    low = lora.unet.get(module_name)
                    if low is not None and b != a:
                        value = value + (float(b) - float(a)) * low.delta().to(value.device)
                weights[name] = value.to(current[name].dtype)
        assert self.backend is not None
        try:
            self.backend.refit_unet(weights)
        except (RuntimeError, KeyError, NotImplementedError) as err:
            raise ParamError("lora_scales", f"the engine refit failed: {err}") from err

    def _rescale_loras(
        self,
        new_state: dict[str, Any],
        cfg_type: CfgType,
        n: int,
        current: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Change the fused scales of the torch modules; re-encode prompts if the text encoder changed."""
        factors = self.models.lora_factors
        old, new = self.state["lora_scales"], new_state["lora_scales"]
        rescale_loras(self.models.unet, factors, old, new)
        changed_text = rescale_loras(self.models.text_encoder, factors, old, new, "text_encoder")
        self.models.lora_scales = list(new)
        loras = self.models.identity.get("loras")
        if isinstance(loras, list) and len(loras) == len(new):
            self.models.identity["loras"] = [[entry[0], s] for entry, s in zip(loras, new, strict=True)]
        if not changed_text:
            return current
        self._transition = None
        positive, negative = self._prompt_embeddings(new_state)
        return positive, negative, layout_embeddings(cfg_type, n, positive, negative)

    def unet_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latents, timesteps and prompt embeddings of one UNet call of the stream batch now.

        Shapes ``(B, C, h, w)``, ``(B,)``, ``(B, 77, D)`` with B = ``unet_batch_size``.
        """
        latents, timesteps = self.batch.unet_inputs()
        return latents, timesteps, self._embeddings

    def t_index_list_for_strength(self, strength: Any, n: int) -> list[int]:
        """The t_index_list of ``n`` slots that ``/strength`` means (``ParamError`` if refused)."""
        value = params.get("strength").coerce(strength)
        return strength_to_t_index_list(value, n, self.settings.num_inference_steps)

    @property
    def current_positive(self) -> torch.Tensor:
        """The positive embedding ``(1, 77, D)`` in use now (mid-crossfade: the mix)."""
        if self._transition is None:
            return self._positive
        previous, progress = self._transition
        return slerp(previous, self._positive, progress)

    def set_prompt_transition(self, previous: torch.Tensor | None, progress: float) -> None:
        """Crossfade from ``previous`` to the current prompt: ``slerp(previous, target, progress)``.

        Called by the runtime once per frame while a ``/prompt s f`` crossfade runs (tiny
        tensors; no text encoding). ``previous=None`` or ``progress >= 1`` ends it.
        """
        if previous is None or progress >= 1.0:
            self._transition = None
            mixed = self._positive
        else:
            self._transition = (previous, max(0.0, float(progress)))
            mixed = self.current_positive
        self._embeddings = layout_embeddings(self.batch.cfg_type, self.batch.n, mixed, self._negative)

    def reset(self) -> None:
        """Empty the stream batch and the filter reference (e.g. after an input cut)."""
        self.batch.reset()
        self.similarity_filter.reset()
        self.last_output = None

    @property
    def unet_batch_size(self) -> int:
        """UNet batch per frame for the current n and cfg mode."""
        return self.batch.unet_batch

    # ------------------------------------------------------------------ helpers
    def _schedule(self, t_index_list: list[int]) -> StreamSchedule:
        steps = self.settings.num_inference_steps
        if max(t_index_list) >= steps:
            raise ParamError(
                "t_index_list",
                f"{t_index_list} has an index >= num_inference_steps ({steps}); "
                f"allowed: strictly increasing integers in [0, {steps - 1}]",
            )
        return build_schedule(
            self.models.alphas_cumprod,
            t_index_list,
            num_inference_steps=steps,
            original_inference_steps=max(steps, self.models.original_inference_steps),
            device=self.device,
            dtype=self.dtype,
        )

    def latent_shape_for(self, width: int, height: int) -> tuple[int, int, int]:
        """Latent ``(C, h, w)`` of a ``width`` x ``height`` frame; ``ParamError`` if it does not divide."""
        factor = self.models.vae_scale_factor
        if width % factor or height % factor:
            raise ParamError(
                "resolution",
                f"{width}x{height} does not divide into this model's {factor}x{factor} latent pixels; "
                f"allowed: multiples of {factor}",
            )
        return (self.models.latent_channels, height // factor, width // factor)

    def _noise(
        self, state: Mapping[str, Any], n: int, latent_shape: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        """Cached per-slot noise ``(n, C, h, w)`` from the seed or the seed blend (CPU RNG)."""
        shape = (n, *(latent_shape or self.latent_shape))
        blend = state["seed_blend"] or [(state["seed"], 1.0)]
        noises = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed, _ in blend]
        mixed = (
            noises[0]
            if len(noises) == 1
            else blend_noise(noises, [w for _, w in blend], BlendMethod(state["prompt_blend_method"]))
        )
        return mixed.to(device=self.device, dtype=self.dtype)

    def _prompt_embeddings(self, state: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        method = BlendMethod(state["prompt_blend_method"])
        blend = state["prompt_blend"]
        positive = self.prompts.encode_blend(blend, method) if blend else self.prompts.encode(state["prompt"])
        return positive, self.prompts.encode(state["negative_prompt"])

    def _attention_groups(self) -> tuple[tuple[int, int], ...]:
        return batch_groups_for(self.batch.cfg_type, self.batch.n)

    def unet_shape(
        self,
        n: int | None = None,
        cfg_type: CfgType | None = None,
        latent_shape: tuple[int, int, int] | None = None,
    ) -> UNetShape:
        """The fixed UNet shapes of the current (or a proposed) n, cfg mode and latent size."""
        n = self.batch.n if n is None else n
        cfg_type = self.batch.cfg_type if cfg_type is None else cfg_type
        channels, height, width = latent_shape or self.latent_shape
        return UNetShape(
            batch=unet_batch_size(cfg_type, n),
            latent_channels=channels,
            latent_height=height,
            latent_width=width,
            text_length=int(self._positive.shape[1]),
            text_dim=int(self._positive.shape[2]),
            cross_frame_groups=(
                batch_groups_for(cfg_type, n) if self.settings.cross_frame_attention else None
            ),
        )

    def vae_shape(self, width: int | None = None, height: int | None = None) -> VaeShape:
        """The fixed VAE shapes of the current (or a proposed) output size."""
        return VaeShape(
            height=self.height if height is None else height,
            width=self.width if width is None else width,
            latent_channels=self.models.latent_channels,
            scale_factor=self.models.vae_scale_factor,
        )

    def _install_cross_frame_attention(self) -> None:
        """Route every self-attention (``attn1``) layer of the UNet through cross-frame attn."""
        unet = self.models.unet
        processor = CrossFrameAttnProcessor(self._attention_groups())
        processors = {
            name: (processor if name.endswith("attn1.processor") else current)
            for name, current in unet.attn_processors.items()
        }
        unet.set_attn_processor(processors)
        self._cross_frame = processor

    def _check_image(self, image: torch.Tensor | None) -> None:
        expected = (1, 3, self.height, self.width)
        if image is None:
            raise ValueError(f"img2img needs an image of shape {expected}; got None")
        if tuple(image.shape) != expected or not image.is_floating_point():
            raise ValueError(
                f"image of shape {tuple(image.shape)} and dtype {image.dtype}; expected a float "
                f"tensor of shape {expected} in [-1, 1] (use engine.imageops.frame_to_tensor)"
            )

    def _check_settings(self, settings: PipelineSettings) -> None:
        factor = self.models.vae_scale_factor
        for name in ("width", "height"):
            value = getattr(settings, name)
            if value % factor or value <= 0:
                raise ValueError(f"{name} {value} is not a positive multiple of {factor}")
        params.get("t_index_list").coerce(settings.t_index_list)
