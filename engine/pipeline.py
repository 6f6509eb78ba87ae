"""StreamPipeline: encode → stream step → decode; owns the caches; plans and commits live changes."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from engine import params
from engine.accel.base import Conditioning, UNetRunner, UNetShape, VaeRunner, VaeShape
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.conditioning.image_prompt import ImagePrompts
from engine.conditioning.preprocess import Preprocess, make_preprocessor
from engine.models.bundle import ModelBundle
from engine.models.kinds import ControlPreprocessor
from engine.models.sources import DEFAULT_DEPTH_ID
from engine.params import ENCODED_PARAMS, PIPELINE_PARAMS, ParamError
from engine.prompting import PromptEncoder
from engine.stream.attention import CrossFrameAttnProcessor
from engine.stream.batch import Denoiser, StreamBatch
from engine.stream.blend import blend_noise, slerp
from engine.stream.control import ControlSlots, slot_scales
from engine.stream.feature_bank import FeatureBankAttnProcessor, FeatureCache, feature_layout
from engine.stream.guidance import batch_groups_for, layout_embeddings, unet_batch_size
from engine.stream.modes import BlendMethod, CfgType, GenerationMode
from engine.stream.pooled import split_pooled, time_ids
from engine.stream.schedule import StreamSchedule, build_schedule, strength_to_t_index_list
from engine.stream.similarity import SimilarityFilter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runners:
    """The UNet and VAE runners a pipeline calls (``engine.accel``); torch eager by default."""

    unet: UNetRunner
    vae: VaeRunner


@dataclass(frozen=True)
class BuildTarget:
    """Runners a change needs before it can commit: a UNet shape and, for a new size, the VAE's."""

    unet: UNetShape
    vae: VaeShape | None = None

    @property
    def label(self) -> str:
        """``batch 3`` or ``batch 2 at 768x512``: what is being built, for logs and the status."""
        if self.vae is None:
            return f"batch {self.unet.batch}"
        return f"batch {self.unet.batch} at {self.vae.width}x{self.vae.height}"


@dataclass(frozen=True)
class LoraChange:
    """New scales for the configured LoRAs (``Backend.set_lora_scales`` applies them)."""

    old: list[float]
    new: list[float]
    text_encoder: bool  # the text encoder's weights change too: prompts are encoded again


@dataclass
class FeaturePlan:
    """The feature-cache part of a change: a new bank (another layout), or forget the old one's slots."""

    cache: FeatureCache | None
    reset: bool


@dataclass
class ChangePlan:
    """Everything a live change makes, computed by ``StreamPipeline.plan``; nothing is in use yet.

    ``commit`` swaps it in. ``target`` names the runners it needs when its shapes differ from
    the ones playing; ``lora`` the weight change the backend makes before the commit.
    """

    accepted: dict[str, Any]
    state: dict[str, Any]
    version: int
    unet_shape: UNetShape
    vae_shape: VaeShape
    target: BuildTarget | None
    latent_shape: tuple[int, int, int]
    batch_plan: dict[str, object]
    positive: torch.Tensor
    negative: torch.Tensor
    embeddings: torch.Tensor
    layout_changed: bool
    lora: LoraChange | None
    control: ControlPlan | None = None
    ip_scale: torch.Tensor | None = None
    feature: FeaturePlan | None = None

    @property
    def size_changed(self) -> bool:
        return self.target is not None and self.target.vae is not None


@dataclass(frozen=True)
class ControlNetSettings:
    """One ``model.controlnets`` entry's settings (its weights are in ``ModelBundle.controlnets``).

    Attributes:
        scale: starting scale (``/controlnet_scales`` changes it live; 0 switches it off).
        preprocessor: what makes the condition image of a frame.
        start, end: the share of the denoising schedule it acts on (diffusers'
            ``control_guidance_start``/``end``).
        from_input: the condition comes from the frame being diffused; False: from its own
            source, handed to each pipeline call (``controls``).
        low_threshold, high_threshold: Canny thresholds.
        depth_id: the depth model of ``preprocessor: depth``.
    """

    scale: float = 1.0
    preprocessor: ControlPreprocessor = ControlPreprocessor.NONE
    start: float = 0.0
    end: float = 1.0
    from_input: bool = True
    low_threshold: float = 0.1
    high_threshold: float = 0.2
    depth_id: str = DEFAULT_DEPTH_ID

    @classmethod
    def from_config(cls, entry: Any) -> ControlNetSettings:
        return cls(
            scale=entry.scale,
            preprocessor=ControlPreprocessor(entry.preprocessor),
            start=entry.start,
            end=entry.end,
            from_input=entry.source is None,
            low_threshold=entry.low_threshold,
            high_threshold=entry.high_threshold,
            depth_id=entry.preprocessor_id,
        )


@dataclass
class ControlPlan:
    """The ControlNet part of a change: the slots (new only when the layout changed) and scales."""

    slots: ControlSlots
    scales: torch.Tensor
    active: tuple[bool, ...]


def _live(name: str, kind: Callable[[Any], Any] = lambda v: v) -> Callable[[], Any]:
    """A default factory: the registry's default of ``name`` (``engine.params``), as ``kind``."""
    default = params.get(name).default
    return lambda: kind(copy.deepcopy(default))


@dataclass
class PipelineSettings:
    """Start-up settings of a StreamPipeline: the live parameters' starting values (defaults from
    the registry) and the fixed ones (mode, schedule length, noise, cross-frame attention)."""

    width: int = field(default_factory=lambda: _live("resolution")()[0])
    height: int = field(default_factory=lambda: _live("resolution")()[1])
    mode: GenerationMode = GenerationMode.IMG2IMG
    t_index_list: list[int] = field(default_factory=_live("t_index_list"))
    num_inference_steps: int = 50
    cfg_type: CfgType = field(default_factory=_live("cfg_type", CfgType))
    guidance_scale: float = field(default_factory=_live("guidance_scale"))
    delta: float = field(default_factory=_live("delta"))
    prompt: str = field(default_factory=_live("prompt"))
    negative_prompt: str = field(default_factory=_live("negative_prompt"))
    prompt_blend_method: BlendMethod = field(default_factory=_live("prompt_blend_method", BlendMethod))
    seed: int = field(default_factory=_live("seed"))
    add_noise: bool = True
    cross_frame_attention: bool = False
    similarity_filter_enabled: bool = field(default_factory=_live("similarity_filter_enabled"))
    similarity_filter_threshold: float = field(default_factory=_live("similarity_filter_threshold"))
    similarity_filter_max_skip_frames: int = field(default_factory=_live("similarity_filter_max_skip_frames"))
    feature_cache_enabled: bool = field(default_factory=_live("feature_cache_enabled"))
    feature_cache_frames: int = field(default_factory=_live("feature_cache_frames"))
    feature_cache_interval: int = field(default_factory=_live("feature_cache_interval"))
    feature_cache_strength: float = field(default_factory=_live("feature_cache_strength"))
    feature_cache_injection: float = field(default_factory=_live("feature_cache_injection"))
    feature_cache_threshold: float = field(default_factory=_live("feature_cache_threshold"))
    controlnets: tuple[ControlNetSettings, ...] = ()
    ip_adapter_scale: float = 0.6
    ip_adapter_image: str | None = None
    image_folder: str | None = None  # where /ip_adapter_image names files (the presets folder)
    ip_adapter_from_source: bool = False  # the reference comes from a bridge (set_reference_tokens)

    @classmethod
    def from_config(cls, config: Any) -> PipelineSettings:
        """Read the validated config: every live parameter from its registry ``config_key``."""
        stream = config.stream
        values: dict[str, Any] = {}
        for spec in params.REGISTRY.values():
            if spec.config_key is not None and spec.name in _SETTINGS_FIELDS:
                value = functools.reduce(getattr, spec.config_key.split("."), config)
                values[spec.name] = copy.deepcopy(value)
        return cls(
            width=stream.width,
            height=stream.height,
            mode=GenerationMode(stream.mode),
            num_inference_steps=stream.num_inference_steps,
            add_noise=stream.add_noise,
            cross_frame_attention=stream.cross_frame_attention,
            controlnets=tuple(ControlNetSettings.from_config(entry) for entry in config.model.controlnets),
            **_ip_adapter_settings(config.model.ip_adapter),
            **values,
        )


def _ip_adapter_settings(section: Any) -> dict[str, Any]:
    """The starting IP-Adapter values of ``model.ip_adapter`` (none: nothing), images from presets/."""
    if section is None:
        return {}
    from engine.config.files import presets_dir

    return {
        "ip_adapter_scale": section.scale,
        "ip_adapter_image": section.image,
        "image_folder": str(presets_dir()),
        "ip_adapter_from_source": section.source is not None,
    }


_SETTINGS_FIELDS = frozenset(f.name for f in fields(PipelineSettings))


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
    still filling (the first n − 1 frames). A live change is ``plan(changes)`` (validates and
    computes everything, touches nothing) then ``commit(plan, runners)`` between two frames.

    Args:
        models: loaded model parts (``engine.models``), on their device and dtype.
        settings: start-up values of every live parameter and the fixed ones (size, mode).
        runners: the UNet and VAE runners for the start-up shapes (``engine.accel``); torch
            eager (which serves every shape) by default.
    """

    def __init__(
        self,
        models: ModelBundle,
        settings: PipelineSettings | None = None,
        runners: Runners | None = None,
    ) -> None:
        self.models = models
        self.settings = settings = settings or PipelineSettings()
        self._check_settings(settings)
        self.device, self.dtype = models.device, models.dtype
        self.height, self.width = settings.height, settings.width
        self.latent_shape = self.latent_shape_for(settings.width, settings.height)
        self.mode = settings.mode
        self.runners = runners or Runners(
            TorchUNet.of(models),
            TorchVae(models.vae, models.vae_scaling_factor),
        )
        self.prompts = PromptEncoder(
            models.text_encoder,
            models.tokenizer,
            self.device,
            self.dtype,
            text_encoder_2=models.text_encoder_2,
            tokenizer_2=models.tokenizer_2,
        )
        self.stats = PipelineStats()
        self.last_output: torch.Tensor | None = None
        self.version = 0  # commits so far: a plan made before another commit is stale

        self._configured_lora_scales = list(models.lora_scales)
        self.state: dict[str, Any] = {name: None for name in PIPELINE_PARAMS}  # registry order
        self.state.update(
            params.validate_changes(
                {name: getattr(settings, name) for name in PIPELINE_PARAMS if name in _SETTINGS_FIELDS}
            )
        )
        self.state["lora_scales"] = list(models.lora_scales) if models.lora_factors else None
        self.state["resolution"] = [int(settings.width), int(settings.height)]
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
        # IP-Adapter: the reference image's tokens follow the text tokens, its scale is a tensor
        self.image_prompts = (
            None if models.ip_adapter is None else ImagePrompts(models.ip_adapter, settings.image_folder)
        )
        if self.image_prompts is None:  # no adapter: nothing to scale (scenes save None)
            self.state["ip_adapter_scale"] = self.state["ip_adapter_image"] = None
        elif settings.ip_adapter_image is not None:
            self.image_prompts.path(settings.ip_adapter_image)  # ParamError: not in the presets folder
        self._ip_scale = self._ip_scale_for(self.state)
        self._positive, self._negative = self._prompt_embeddings(self.state)
        self._set_embeddings(layout_embeddings(cfg_type, schedule.n, self._positive, self._negative))
        self._transition: tuple[torch.Tensor, float] | None = None
        self._cross_frame: CrossFrameAttnProcessor | None = None
        if settings.cross_frame_attention:
            self._install_cross_frame_attention()
        # feature cache (StreamV2V): past frames' attn1 features, explicit UNet inputs and output
        self._bank_processors: list[FeatureBankAttnProcessor] = []
        self._before_bank: dict[str, Any] | None = None
        self._feature_cache: FeatureCache | None = None
        if self.state["feature_cache_enabled"]:
            self._install_feature_bank()
            shape = self.unet_shape()
            self._feature_cache = FeatureCache(
                shape.feature_frames, shape.batch, shape.feature_size, self.device, self.dtype
            )
            self._configure_feature_cache(self.state)
        # ControlNets: a preprocessor each, the newest frame of each own source, the slots
        self._preprocessors: list[Preprocess] = [
            make_preprocessor(
                c.preprocessor,
                low_threshold=c.low_threshold,
                high_threshold=c.high_threshold,
                depth_id=c.depth_id,
                device=self.device,
                dtype=self.dtype,
            )
            for c in settings.controlnets
        ]
        self._control_frames: list[torch.Tensor | None] = [None] * len(settings.controlnets)
        self._control: ControlPlan | None = None
        if settings.controlnets:
            self.state["controlnet_scales"] = [float(c.scale) for c in settings.controlnets]
            slots = ControlSlots(
                len(settings.controlnets),
                schedule.n,
                (self.height, self.width),
                cfg_type,
                self.device,
                self.dtype,
            )
            self._control = self._control_plan(self.state, slots)

    # ------------------------------------------------------------------ per frame
    @torch.inference_mode()
    def __call__(
        self, image: torch.Tensor | None = None, controls: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor | None:
        """Process one frame; see the class docstring for shapes.

        ``controls``: for each ControlNet that has its own source, its newest frame ``(1, 3, H',
        W')`` in [-1, 1] or ``None`` (nothing new: the last one is used again); entries of
        ControlNets fed by the input are ignored.
        """
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
            latent = self.batch.noised_input(self.runners.vae.encode(image))
        # 4. one UNet call on the stream batch (with each slot's ControlNet conditions) + LCM step
        self.stats.unet_calls += 1
        denoise: Denoiser = self.runners.unet
        conditioning = None
        cache = self._feature_cache
        if self._control is not None or self._ip_scale is not None or self._added is not None or cache:
            conditioning = self._conditioning(image, controls)
            unet = self.runners.unet
            denoise = lambda x, t, e: unet(x, t, e, conditioning)  # noqa: E731
        x0 = self.batch.step(latent, denoise, self._unet_embeddings)
        if cache is not None and conditioning is not None and conditioning.feature_out:
            cache.push(conditioning.feature_out[-1])  # this frame's features, for the next frames
        if x0 is None:
            return None
        # 5. decode the finished (oldest) slot
        self.stats.vae_decodes += 1
        output = self.runners.vae.decode(x0).clamp_(-1.0, 1.0)
        self.stats.frames_out += 1
        self.last_output = output
        return output

    # ------------------------------------------------------------------ live changes
    def target_for(self, changes: Mapping[str, Any]) -> BuildTarget | None:
        """The runners ``changes`` needs when its shapes differ from the ones playing, else ``None``.

        Cheap (validation and shape arithmetic, no tensors): the runtime asks before it plans, so
        a change that waits for a build is planned once, when its runners are ready.

        Raises:
            ParamError: naming the parameter, the bad value and what is allowed.
        """
        _accepted, state = self._proposal(changes)
        return self._target(*self._shapes(state))

    def plan(self, changes: Mapping[str, Any]) -> ChangePlan:
        """Validate ``changes`` and make everything they need; the pipeline is not touched.

        Prompts are encoded only when their text changes; the stream batch's new tensors (the
        big allocations of a resolution change) are made here, so running out of memory refuses
        the change instead of half-applying it.

        Raises:
            ParamError: naming the parameter, the bad value and what is allowed.
        """
        accepted, state = self._proposal(changes)
        unet_shape, vae_shape = self._shapes(state)
        cfg_type = CfgType(state["cfg_type"])
        width, height = state["resolution"]
        latent_shape = self.latent_shape_for(width, height)
        size_changed = latent_shape != self.latent_shape or (width, height) != (self.width, self.height)
        schedule_changed = state["t_index_list"] != self.state["t_index_list"]
        schedule = self._schedule(state["t_index_list"]) if schedule_changed else self.batch.schedule
        noise_keys = ("seed", "seed_blend", "prompt_blend_method")
        noise_changed = schedule_changed or size_changed or any(state[k] != self.state[k] for k in noise_keys)
        noise = self._noise(state, schedule.n, latent_shape) if noise_changed else self.batch.noise
        prompt_keys = (*ENCODED_PARAMS, "prompt_blend_method")
        prompt_changed = any(state[k] != self.state[k] for k in prompt_keys)
        positive, negative = (
            self._prompt_embeddings(state) if prompt_changed else (self._positive, self._negative)
        )
        target = self._target(unet_shape, vae_shape)
        layout_changed = prompt_changed or target is not None
        embeddings = (
            layout_embeddings(cfg_type, schedule.n, positive, negative)
            if layout_changed
            else self._embeddings
        )
        batch_plan = (
            self.batch.plan(schedule, noise, cfg_type)
            if noise_changed or cfg_type is not self.batch.cfg_type  # noise follows the schedule
            else {}
        )
        control = None
        if self._control is not None:
            slots = self._control.slots
            layout = (schedule.n, (height, width), cfg_type) != (slots.n, slots.size, slots.cfg_type)
            if layout:
                slots = slots.resized(schedule.n, (height, width), cfg_type)
            if layout or state["controlnet_scales"] != self.state["controlnet_scales"] or schedule_changed:
                control = self._control_plan(state, slots)
        ip_keys = ("ip_adapter_scale", "ip_adapter_image")
        ip_scale = None
        if self.image_prompts is not None and any(state[k] != self.state[k] for k in ip_keys):
            ip_scale = self._ip_scale_for(state)
        feature = self._feature_plan(state, unet_shape, prompt_changed)
        old_scales, new_scales = self.state["lora_scales"], state["lora_scales"]
        lora = None
        if old_scales is not None and new_scales is not None and old_scales != new_scales:
            text = any(f.text_encoder or f.text_encoder_2 for f in self.models.lora_factors)
            lora = LoraChange(list(old_scales), list(new_scales), text)
        return ChangePlan(
            accepted=accepted,
            state=state,
            version=self.version,
            unet_shape=unet_shape,
            vae_shape=vae_shape,
            target=target,
            latent_shape=latent_shape,
            batch_plan=batch_plan,
            positive=positive,
            negative=negative,
            embeddings=embeddings,
            layout_changed=layout_changed,
            lora=lora,
            control=control,
            ip_scale=ip_scale,
            feature=feature,
        )

    def commit(self, plan: ChangePlan, runners: Runners | None = None) -> dict[str, Any]:
        """Swap ``plan`` in at a frame boundary; returns the accepted changes (what to echo).

        ``runners`` are the ones of the plan's shapes (``None``: keep the current ones, which
        then must serve the new shapes — torch's serve every shape). LoRA weights must already
        be at the plan's scales (``Backend.set_lora_scales``); when the text encoder changed
        with them, the prompts are encoded again here.

        Raises:
            RuntimeError: the plan is stale (another commit came after it was made).
            ParamError: the size changes and the current runners are fixed to the old one;
                both before anything changed.
        """
        self.check_commit(plan, runners)
        positive, negative, embeddings = plan.positive, plan.negative, plan.embeddings
        if plan.lora is not None:
            self.models.lora_scales = list(plan.lora.new)
            if plan.lora.text_encoder:  # the cached embeddings are of the old weights
                self.prompts.clear()
                positive, negative = self._prompt_embeddings(plan.state)
                embeddings = layout_embeddings(
                    CfgType(plan.state["cfg_type"]), len(plan.state["t_index_list"]), positive, negative
                )
        if runners is not None:
            self.runners = runners
        if plan.size_changed:
            self.width, self.height = plan.state["resolution"]
            self.latent_shape = plan.latent_shape
            self.similarity_filter.reset()
            self.last_output = None
        self.batch.commit(plan.batch_plan)
        self.batch.guidance_scale = plan.state["guidance_scale"]
        self.batch.delta = plan.state["delta"]
        if plan.layout_changed or (plan.lora is not None and plan.lora.text_encoder):
            self._transition = None
        self._positive, self._negative = positive, negative
        self._set_embeddings(embeddings)
        self.similarity_filter.configure(
            plan.state["similarity_filter_threshold"], plan.state["similarity_filter_max_skip_frames"]
        )
        if not plan.state["similarity_filter_enabled"]:
            self.similarity_filter.reset()
        self.state = plan.state
        if plan.control is not None:
            self._control = plan.control
        if plan.ip_scale is not None:
            self._ip_scale = plan.ip_scale
        self._commit_feature_cache(plan)
        if self._cross_frame is not None:
            self._cross_frame.groups = self._attention_groups()
        for processor in self._bank_processors:
            processor.groups = self._attention_groups() if self.settings.cross_frame_attention else None
        self.version += 1
        logger.debug("committed %s", sorted(plan.accepted))
        return plan.accepted

    def check_commit(self, plan: ChangePlan, runners: Runners | None) -> None:
        """What ``commit`` refuses, checked before anything changes (see ``commit``)."""
        if plan.version != self.version:
            raise RuntimeError(f"stale change plan (made at commit {plan.version}, now {self.version})")
        if plan.size_changed and runners is None and not self._runners_serve_any_size():
            raise ParamError(
                "resolution",
                f"this pipeline's runners are fixed to {self.width}x{self.height} and no others "
                "were given; allowed: the current size",
            )

    def _proposal(self, changes: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The accepted changes (canonical) and the full new state; ``ParamError`` if refused."""
        accepted = params.validate_changes(changes, PIPELINE_PARAMS)
        state = dict(self.state)
        state.update(accepted)
        # /prompt ends a prompt blend, /seed a seed blend, /t_index_list what /strength made
        for name in params.overridden(accepted) - set(accepted):
            state[name] = None
        self._check_t_index_list(state["t_index_list"])
        if accepted.get("strength") is not None:
            n = len(state["t_index_list"])  # of the list in this change, else of the one playing
            state["t_index_list"] = strength_to_t_index_list(
                accepted["strength"], n, self.settings.num_inference_steps
            )
        if "lora_scales" in accepted:
            state["lora_scales"] = accepted["lora_scales"] = self._check_lora_scales(accepted["lora_scales"])
        if "controlnet_scales" in accepted:
            scales = self._check_controlnet_scales(accepted["controlnet_scales"])
            state["controlnet_scales"] = accepted["controlnet_scales"] = scales
        for name in ("ip_adapter_scale", "ip_adapter_image"):
            if name in accepted:
                state[name] = accepted[name] = self._check_ip_adapter(name, accepted[name])
        self._check_t_index_list(state["t_index_list"])
        return accepted, state

    def _shapes(self, state: Mapping[str, Any]) -> tuple[UNetShape, VaeShape]:
        """The UNet and VAE shapes ``state`` runs at (``ParamError`` when the size does not divide)."""
        width, height = state["resolution"]
        latent_shape = self.latent_shape_for(width, height)
        frames = self._feature_frames(state)
        unet = self.unet_shape(len(state["t_index_list"]), CfgType(state["cfg_type"]), latent_shape, frames)
        return unet, self.vae_shape(width, height)

    def _target(self, unet_shape: UNetShape, vae_shape: VaeShape) -> BuildTarget | None:
        if unet_shape == self.unet_shape() and vae_shape == self.vae_shape():
            return None
        return BuildTarget(unet_shape, vae_shape if vae_shape != self.vae_shape() else None)

    def _runners_serve_any_size(self) -> bool:
        return isinstance(self.runners.unet, TorchUNet) and isinstance(self.runners.vae, TorchVae)

    # ------------------------------------------------------------------ ControlNets
    def _check_controlnet_scales(self, scales: list[float] | None) -> list[float] | None:
        configured = self.settings.controlnets
        if scales is None:  # "the configured scales" (e.g. a scene saved without ControlNets)
            return [float(c.scale) for c in configured] if configured else None
        if not configured:
            raise ParamError(
                "controlnet_scales", "no model.controlnets are configured: there is nothing to scale"
            )
        if len(scales) != len(configured):
            raise ParamError(
                "controlnet_scales",
                f"{len(scales)} scales given; allowed: exactly {len(configured)} "
                "(one per model.controlnets entry, in config order)",
            )
        return list(scales)

    def _check_ip_adapter(self, name: str, value: Any) -> Any:
        if self.image_prompts is None:
            if value is None:
                return None
            raise ParamError(
                name, "no model.ip_adapter is configured: there is no reference image to steer by"
            )
        if name == "ip_adapter_scale":
            return float(self.settings.ip_adapter_scale) if value is None else value
        if value is not None and self.settings.ip_adapter_from_source:
            raise ParamError(
                name, f"{value!r} refused: the reference image comes from model.ip_adapter.source (a bridge)"
            )
        if value is not None:
            self.image_prompts.path(value)  # ParamError when it is not a file in the presets folder
        return value

    def _ip_scale_for(self, state: Mapping[str, Any]) -> torch.Tensor | None:
        """The IP-Adapter scale ``(1,)`` of ``state``: 0 without a reference image."""
        if self.image_prompts is None:
            return None
        referenced = state["ip_adapter_image"] is not None or self.image_prompts.live is not None
        scale = float(state["ip_adapter_scale"]) if referenced else 0.0
        return torch.tensor([scale], device=self.device, dtype=self.dtype)

    def _control_plan(self, state: Mapping[str, Any], slots: ControlSlots) -> ControlPlan:
        """Each UNet row's ControlNet scales for ``state`` (its schedule, cfg mode and scales)."""
        configured = self.settings.controlnets
        scales, active = slot_scales(
            state["controlnet_scales"],
            [(c.start, c.end) for c in configured],
            state["t_index_list"],
            self.settings.num_inference_steps,
            CfgType(state["cfg_type"]),
        )
        return ControlPlan(slots, scales.to(device=self.device, dtype=self.dtype), active)

    def _push_conditions(
        self, image: torch.Tensor | None, controls: list[torch.Tensor | None] | None
    ) -> torch.Tensor:
        """This frame's condition of each active ControlNet into slot 0; the UNet's control images.

        A ControlNet switched off (scale 0) is not preprocessed; its slots refill within n
        frames once it is on again. Before its own source sent anything, its condition is black.
        """
        assert self._control is not None
        conditions: list[torch.Tensor | None] = []
        for index, (settings, preprocess) in enumerate(zip(self.settings.controlnets, self._preprocessors)):
            if not settings.from_input and controls is not None and controls[index] is not None:
                self._control_frames[index] = controls[index]
            frame = image if settings.from_input else self._control_frames[index]
            if not self._control.active[index]:
                conditions.append(None)
            elif frame is None:
                conditions.append(
                    torch.zeros((1, 3, self.height, self.width), device=self.device, dtype=self.dtype)
                )
            else:
                frame = frame.to(device=self.device, dtype=self.dtype)
                if tuple(frame.shape[-2:]) != (self.height, self.width):
                    frame = torch.nn.functional.interpolate(
                        frame, size=(self.height, self.width), mode="bilinear", antialias=True
                    )
                conditions.append(preprocess(frame))
        slots = self._control.slots
        slots.push(conditions)
        return slots.unet_images()

    def _conditioning(
        self, image: torch.Tensor | None, controls: list[torch.Tensor | None] | None
    ) -> Conditioning:
        """This frame's UNet inputs besides latents, timesteps and embeddings."""
        control = self._control
        cache = self._feature_cache
        return Conditioning(
            control_images=None if control is None else self._push_conditions(image, controls),
            control_scales=None if control is None else control.scales,
            active=() if control is None else control.active,
            ip_scale=self._ip_scale,
            text_embeds=self._text_embeds,
            time_ids=self._time_ids,
            feature_bank=None if cache is None else cache.bank,
            feature_bias=None if cache is None else cache.bias,
            feature_injection=None if cache is None else cache.injection,
            feature_out=None if cache is None else [],
            injecting=cache is not None and cache.injecting,
        )

    # ------------------------------------------------------------------ feature cache
    def _feature_plan(
        self, state: Mapping[str, Any], shape: UNetShape, prompt_changed: bool
    ) -> FeaturePlan | None:
        """A new bank when the cache turns on or its layout (F, B, N) changes; otherwise whether
        a new prompt or seed makes the cached features stale."""
        if not state["feature_cache_enabled"]:
            return None
        layout = (shape.feature_frames, shape.batch, shape.feature_size)
        current = self._feature_cache
        if current is None or tuple(current.bank.shape) != layout:
            return FeaturePlan(FeatureCache(*layout, self.device, self.dtype), reset=False)
        seed_changed = any(state[k] != self.state[k] for k in ("seed", "seed_blend"))
        return FeaturePlan(None, reset=prompt_changed or seed_changed)

    def _commit_feature_cache(self, plan: ChangePlan) -> None:
        enabled = plan.state["feature_cache_enabled"]
        if enabled and self._before_bank is None:
            self._install_feature_bank()
        elif not enabled and self._before_bank is not None:
            from engine.models.feature_cache import restore

            restore(self.models.unet, self._before_bank)
            self._before_bank, self._bank_processors = None, []
        if not enabled:
            self._feature_cache = None
            return
        if plan.feature is not None and plan.feature.cache is not None:
            self._feature_cache = plan.feature.cache
        elif plan.feature is not None and plan.feature.reset and self._feature_cache is not None:
            self._feature_cache.reset()
        self._configure_feature_cache(plan.state)

    def _configure_feature_cache(self, state: Mapping[str, Any]) -> None:
        assert self._feature_cache is not None
        self._feature_cache.configure(
            state["feature_cache_interval"],
            state["feature_cache_strength"],
            state["feature_cache_injection"],
            state["feature_cache_threshold"],
        )

    def _install_feature_bank(self) -> None:
        from engine.models.feature_cache import install_feature_bank  # diffusers: on first use

        groups = self._attention_groups() if self.settings.cross_frame_attention else None
        self._bank_processors, self._before_bank = install_feature_bank(self.models.unet, groups)

    def _feature_size(self, latent_shape: tuple[int, int, int]) -> int:
        """N of the feature cache at ``latent_shape``: every attn1 layer's values of one row."""
        _, height, width = latent_shape
        return feature_layout(self.models.unet, height, width).total

    # ------------------------------------------------------------------ LoRA scales
    def _check_lora_scales(self, scales: list[float] | None) -> list[float] | None:
        factors = self.models.lora_factors
        if scales is None and not factors:
            return None  # "the configured scales" of no LoRAs (e.g. a scene): nothing to do
        if not factors:
            raise ParamError("lora_scales", "no model.loras are configured: there is nothing to scale")
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

    def unet_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latents, timesteps and prompt embeddings of one UNet call of the stream batch now.

        Shapes ``(B, C, h, w)``, ``(B,)``, ``(B, 77, D)`` with B = ``unet_batch_size`` (SDXL's
        added inputs: ``added_inputs``).
        """
        latents, timesteps = self.batch.unet_inputs()
        return latents, timesteps, self._unet_embeddings

    @property
    def added_inputs(self) -> Conditioning | None:
        """SDXL: ``text_embeds (B, P)`` and ``time_ids (B, 6)`` of the UNet call now; SD: None."""
        if self._added is None:
            return None
        return Conditioning(text_embeds=self._text_embeds, time_ids=self._time_ids)

    def _set_embeddings(self, embeddings: torch.Tensor) -> None:
        """The laid-out prompt tensor ``(B, L, D)`` (SDXL: pooled token first) and the UNet's
        inputs from it: the tokens, and for SDXL the pooled embeddings and the size's time ids."""
        self._embeddings = embeddings
        pooled_dim = self.models.pooled_dim
        if not pooled_dim:
            self._unet_embeddings, self._added = embeddings, None
            return
        tokens, pooled = split_pooled(embeddings, pooled_dim)
        ids = time_ids(self.height, self.width, embeddings.shape[0], self.device, self.dtype)
        self._unet_embeddings, self._added = tokens, (pooled, ids)

    @property
    def _text_embeds(self) -> torch.Tensor | None:
        return None if self._added is None else self._added[0]

    @property
    def _time_ids(self) -> torch.Tensor | None:
        return None if self._added is None else self._added[1]

    @property
    def current_positive(self) -> torch.Tensor:
        """The positive embedding ``(1, 77, D)`` in use now (mid-crossfade: the mix)."""
        if self._transition is None:
            return self._positive
        previous, progress = self._transition
        return slerp(previous, self._positive, progress)

    def set_reference_tokens(self, tokens: torch.Tensor) -> None:
        """Steer by ``tokens`` ``(1, T, D)``: the IP-Adapter image tokens of the newest frame of
        ``model.ip_adapter.source``, encoded off the frame loop (``engine.runtime.reference_source``).

        Called by the runtime between two frames; tiny tensor work (no encoding). The tokens stay
        the reference for later prompt changes until the next ones arrive.
        """
        if self.image_prompts is None or not self.settings.ip_adapter_from_source:
            raise ValueError("set_reference_tokens needs model.ip_adapter with a source")
        tokens = tokens.to(device=self.device, dtype=self._positive.dtype)
        text = self._positive[:, : self._positive.shape[1] - tokens.shape[1]]
        self.image_prompts.live = tokens
        self._positive = torch.cat([text, tokens], dim=1)
        previous, progress = self._transition or (None, 1.0)  # a running crossfade goes on
        self.set_prompt_transition(previous, progress)
        self._ip_scale = self._ip_scale_for(self.state)

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
        self._set_embeddings(layout_embeddings(self.batch.cfg_type, self.batch.n, mixed, self._negative))

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
    def _check_t_index_list(self, t_index_list: list[int]) -> None:
        steps = self.settings.num_inference_steps
        if max(t_index_list) >= steps:
            raise ParamError(
                "t_index_list",
                f"{t_index_list} has an index >= num_inference_steps ({steps}); "
                f"allowed: strictly increasing integers in [0, {steps - 1}]",
            )

    def _schedule(self, t_index_list: list[int]) -> StreamSchedule:
        self._check_t_index_list(t_index_list)
        steps = self.settings.num_inference_steps
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
        negative = self.prompts.encode(state["negative_prompt"])
        if self.models.pooled_dim and not state["negative_prompt"]:
            negative = torch.zeros_like(negative)  # SDXL: an empty negative is zeros (as diffusers)
        if self.image_prompts is not None:  # the image tokens after the text tokens (IpAttnProcessor)
            image = self.image_prompts.reference(state["ip_adapter_image"]).to(positive.dtype)
            empty = self.image_prompts.tokens(None).to(negative.dtype)
            positive, negative = torch.cat([positive, image], dim=1), torch.cat([negative, empty], dim=1)
        return positive, negative

    def _attention_groups(self) -> tuple[tuple[int, int], ...]:
        return batch_groups_for(self.batch.cfg_type, self.batch.n)

    def unet_shape(
        self,
        n: int | None = None,
        cfg_type: CfgType | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        feature_frames: int | None = None,
    ) -> UNetShape:
        """The fixed UNet shapes of the current (or a proposed) n, cfg mode, latent size and
        feature-cache size (0: none)."""
        n = self.batch.n if n is None else n
        cfg_type = self.batch.cfg_type if cfg_type is None else cfg_type
        latent_shape = latent_shape or self.latent_shape
        if feature_frames is None:
            feature_frames = self._feature_frames(self.state)
        channels, height, width = latent_shape
        return UNetShape(
            batch=unet_batch_size(cfg_type, n),
            latent_channels=channels,
            latent_height=height,
            latent_width=width,
            text_length=int(self._unet_embeddings.shape[1]),
            text_dim=int(self._unet_embeddings.shape[2]),
            cross_frame_groups=(
                batch_groups_for(cfg_type, n) if self.settings.cross_frame_attention else None
            ),
            controlnets=len(self.models.controlnets),
            image_scale=self.models.vae_scale_factor,
            ip_adapter=self.models.ip_adapter is not None,
            pooled_dim=self.models.pooled_dim,
            feature_frames=feature_frames,
            feature_size=self._feature_size(latent_shape) if feature_frames else 0,
        )

    @staticmethod
    def _feature_frames(state: Mapping[str, Any]) -> int:
        return int(state["feature_cache_frames"]) if state["feature_cache_enabled"] else 0

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
        if len(settings.controlnets) != len(self.models.controlnets):
            raise ValueError(
                f"{len(settings.controlnets)} ControlNet settings for {len(self.models.controlnets)} loaded "
                "ControlNets; give one per model.controlnets entry"
            )
        if settings.mode is GenerationMode.TXT2IMG and any(c.from_input for c in settings.controlnets):
            raise ValueError("txt2img has no input frames: a ControlNet needs its own source there")
