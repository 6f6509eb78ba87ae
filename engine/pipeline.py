"""StreamPipeline: encode → stream step → decode; owns the caches; plans and commits live changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from engine import params
from engine.accel.base import Conditioning, UNetShape, VaeShape
from engine.accel.torch_backend import TorchUNet, TorchVae
from engine.extensions import registered, shape_fields
from engine.extensions.base import Change, Extension, FrameInputs
from engine.extensions.controlnet import ControlNetSettings
from engine.extensions.ip_adapter import IpAdapter
from engine.models.bundle import ModelBundle
from engine.models.lora import check_lora_scales
from engine.params import ENCODED_PARAMS, PIPELINE_PARAMS, ParamError
from engine.pipeline_plan import BuildTarget, ChangePlan, LoraChange, PipelineStats, Runners
from engine.pipeline_settings import SETTINGS_FIELDS, PipelineSettings, check_image, check_settings
from engine.prompting import PromptEncoder, PromptLayout
from engine.stream.batch import Denoiser, StreamBatch
from engine.stream.blend import seeded_noise
from engine.stream.guidance import layout_embeddings, unet_batch_size
from engine.stream.modes import BlendMethod, CfgType, GenerationMode
from engine.stream.schedule import strength_to_t_index_list
from engine.stream.similarity import SimilarityFilter

__all__ = ["BuildTarget", "ControlNetSettings", "PipelineSettings", "Runners", "StreamPipeline"]

logger = logging.getLogger(__name__)


class StreamPipeline:
    """Real-time img2img / txt2img on a stream of frames (StreamDiffusion).

    ``pipeline(image)`` takes one frame ``(1, 3, H, W)`` in [-1, 1] (``None`` in txt2img mode,
    or there the fed-back picture of the runtime's feedback loop) and returns the finished frame
    of the same shape, or ``None`` while the stream batch is still filling (the first n − 1
    frames). A live change is ``plan(changes)`` (validates and computes everything, touches
    nothing) then ``commit(plan, runners)`` between two frames.
    What changes the UNet call (ControlNets, IP-Adapter, SDXL's added conditioning, the feature
    cache, cross-frame attention, ...) lives in ``extensions`` (``engine.extensions``), asked at
    each step of both paths.

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
        check_settings(settings, models.vae_scale_factor)
        self.device, self.dtype = models.device, models.dtype
        self.height, self.width = settings.height, settings.width
        self.latent_shape = self.models.latent_shape(settings.width, settings.height)
        self.mode = settings.mode
        self.runners = runners or Runners(
            TorchUNet.of(models), TorchVae(models.vae, models.vae_scaling_factor)
        )
        encoders = {"text_encoder_2": models.text_encoder_2, "tokenizer_2": models.tokenizer_2}
        self.prompts = PromptEncoder(
            models.text_encoder, models.tokenizer, self.device, self.dtype, **encoders
        )
        self.stats = PipelineStats()
        self.last_output: torch.Tensor | None = None
        self.version = 0  # commits so far: a plan made before another commit is stale

        self._configured_lora_scales = list(models.lora_scales)
        self.state: dict[str, Any] = {name: None for name in PIPELINE_PARAMS}  # registry order
        self.state.update(
            params.validate_changes(
                {name: getattr(settings, name) for name in PIPELINE_PARAMS if name in SETTINGS_FIELDS}
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
        schedule = self.models.schedule(self.state["t_index_list"], settings.num_inference_steps)
        self.batch = StreamBatch(
            schedule,
            self._noise(self.state, schedule.n),
            cfg_type=cfg_type,
            prediction_type=models.prediction_type,
            add_noise=settings.add_noise,
            guidance_scale=settings.guidance_scale,
            delta=settings.delta,
        )
        # the extensions these settings and models configure, in graph order (an absent one's
        # parameters stay None: "as configured", what scenes save)
        self.extensions: dict[str, Extension] = {}
        for kind in registered():
            extension = kind.create(self)
            if extension is None:
                self.state.update(dict.fromkeys(kind.params))
            else:
                self.extensions[kind.name] = extension
        self.layout = PromptLayout(self.prompts, self.extensions)
        positive, negative = self.layout.encode(self.state)
        embeddings = layout_embeddings(cfg_type, schedule.n, positive, negative)
        self.layout.play(positive, negative, embeddings, (self.height, self.width))
        shape = self.unet_shape()
        for extension in self.extensions.values():
            extension.start(self.state, shape)

    # ------------------------------------------------------------------ per frame
    @torch.inference_mode()
    def __call__(
        self, image: torch.Tensor | None = None, controls: list[torch.Tensor | None] | None = None
    ) -> torch.Tensor | None:
        """Process one frame; see the class docstring for shapes.

        In txt2img mode an ``image`` (the runtime's feedback: the previous output, transformed)
        takes the img2img path for this frame (VAE encode, noised into slot 0; no similarity
        filter, which compares input frames); ``None`` starts slot 0 from its cached noise.

        ``controls``: for each ControlNet that has its own source, its newest frame ``(1, 3, H',
        W')`` in [-1, 1] or ``None`` (nothing new: the last one is used again); entries of
        ControlNets fed by the input are ignored.
        """
        self.stats.frames_in += 1
        # 1. check the input and take the slot-0 latent (txt2img without an image: pure noise)
        txt2img = self.mode is GenerationMode.TXT2IMG
        if txt2img and image is None:
            latent = self.batch.noise[:1]
        else:
            check_image(image, self.height, self.width)
            assert image is not None
            image = image.to(device=self.device, dtype=self.dtype)
            # 2. similarity filter: a skipped frame re-emits the previous output, no VAE/UNet
            if self.state["similarity_filter_enabled"] and not txt2img:
                if self.last_output is None:
                    self.similarity_filter.mark_processed(image)
                elif self.similarity_filter.should_skip(image):
                    self.stats.skipped += 1
                    return self.last_output
            # 3. VAE encode, then noise slot 0 with its cached noise
            self.stats.vae_encodes += 1
            latent = self.batch.noised_input(self.runners.vae.encode(image))
        # 4. one UNet call on the stream batch with the extensions' inputs + LCM step
        self.stats.unet_calls += 1
        denoise: Denoiser = self.runners.unet
        conditioning = self.conditioning(image, controls)
        if conditioning is not None:
            unet = self.runners.unet
            denoise = lambda x, t, e: unet(x, t, e, conditioning)  # noqa: E731
        x0 = self.batch.step(latent, denoise, self.layout.unet_embeddings)
        # 5. the extensions read what the call gave back (e.g. the feature cache's features)
        if conditioning is not None:
            for extension in self.extensions.values():
                extension.after_frame(conditioning)
        if x0 is None:
            return None
        # 6. decode the finished (oldest) slot
        self.stats.vae_decodes += 1
        output = self.runners.vae.decode(x0).clamp_(-1.0, 1.0)
        self.stats.frames_out += 1
        self.last_output = output
        return output

    def conditioning(
        self, image: torch.Tensor | None = None, controls: list[torch.Tensor | None] | None = None
    ) -> Conditioning | None:
        """This frame's UNet inputs besides latents, timesteps and embeddings, from every extension
        (None: the plain UNet call). Pushes the frame into per-slot state (ControlNet conditions)."""
        if not self.extensions:
            return None
        conditioning = Conditioning()
        frame = FrameInputs(image, controls)
        for extension in self.extensions.values():
            extension.frame(frame, conditioning)
        return conditioning if conditioning.inputs else None

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
        big allocations of a resolution change) and the extensions' are made here, so running
        out of memory refuses the change instead of half-applying it.

        Raises:
            ParamError: naming the parameter, the bad value and what is allowed.
        """
        accepted, state = self._proposal(changes)
        unet_shape, vae_shape = self._shapes(state)
        cfg_type = CfgType(state["cfg_type"])
        width, height = state["resolution"]
        latent_shape = self.models.latent_shape(width, height)
        size_changed = latent_shape != self.latent_shape or (width, height) != (self.width, self.height)
        schedule_changed = state["t_index_list"] != self.state["t_index_list"]
        steps = self.settings.num_inference_steps
        schedule = (
            self.models.schedule(state["t_index_list"], steps) if schedule_changed else self.batch.schedule
        )
        noise_keys = ("seed", "seed_blend", "prompt_blend_method")
        noise_changed = schedule_changed or size_changed or any(state[k] != self.state[k] for k in noise_keys)
        noise = self._noise(state, schedule.n, latent_shape) if noise_changed else self.batch.noise
        prompt_keys = (*ENCODED_PARAMS, "prompt_blend_method")
        prompt_changed = any(state[k] != self.state[k] for k in prompt_keys)
        layout = self.layout
        positive, negative = layout.encode(state) if prompt_changed else (layout.positive, layout.negative)
        target = self._target(unet_shape, vae_shape)
        layout_changed = prompt_changed or target is not None
        embeddings = (
            layout_embeddings(cfg_type, schedule.n, positive, negative)
            if layout_changed
            else layout.embeddings
        )
        batch_plan = (
            self.batch.plan(schedule, noise, cfg_type)
            if noise_changed or cfg_type is not self.batch.cfg_type  # noise follows the schedule
            else {}
        )
        seed_changed = any(state[k] != self.state[k] for k in ("seed", "seed_blend"))
        facts = (schedule_changed, prompt_changed, seed_changed)
        change = Change(state, self.state, schedule.n, cfg_type, (height, width), unet_shape, *facts)
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
            change=change,
            extensions={name: extension.plan(change) for name, extension in self.extensions.items()},
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
                positive, negative = self.layout.encode(plan.state)
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
            self.layout.transition = None
        self.layout.play(positive, negative, embeddings, (self.height, self.width))
        self.similarity_filter.configure(
            plan.state["similarity_filter_threshold"], plan.state["similarity_filter_max_skip_frames"]
        )
        if not plan.state["similarity_filter_enabled"]:
            self.similarity_filter.reset()
        self.state = plan.state
        for name, extension in self.extensions.items():
            extension.commit(plan.extensions.get(name), plan.change)
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
        steps = self.settings.num_inference_steps
        self.models.check_t_index_list(state["t_index_list"], steps)
        if accepted.get("strength") is not None:
            n = len(state["t_index_list"])  # of the list in this change, else of the one playing
            state["t_index_list"] = strength_to_t_index_list(accepted["strength"], n, steps)
        if "lora_scales" in accepted:
            scales = check_lora_scales(
                self.models.lora_factors, self._configured_lora_scales, accepted["lora_scales"]
            )
            state["lora_scales"] = accepted["lora_scales"] = scales
        for kind in registered():  # each extension's own parameters
            extension = self.extensions.get(kind.name)
            if extension is None:
                kind.check_absent(accepted)
            else:
                extension.check(accepted, state)
        self.models.check_t_index_list(state["t_index_list"], steps)
        return accepted, state

    def _shapes(self, state: Mapping[str, Any]) -> tuple[UNetShape, VaeShape]:
        """The UNet and VAE shapes ``state`` runs at (``ParamError`` when the size does not divide)."""
        width, height = state["resolution"]
        latent_shape = self.models.latent_shape(width, height)
        n, cfg_type = len(state["t_index_list"]), CfgType(state["cfg_type"])
        return self.unet_shape(n, cfg_type, latent_shape, state), self.vae_shape(width, height)

    def _target(self, unet_shape: UNetShape, vae_shape: VaeShape) -> BuildTarget | None:
        if unet_shape == self.unet_shape() and vae_shape == self.vae_shape():
            return None
        return BuildTarget(unet_shape, vae_shape if vae_shape != self.vae_shape() else None)

    def _runners_serve_any_size(self) -> bool:
        return isinstance(self.runners.unet, TorchUNet) and isinstance(self.runners.vae, TorchVae)

    # ------------------------------------------------------------------ embeddings
    def unet_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latents, timesteps and prompt embeddings of one UNet call of the stream batch now.

        Shapes ``(B, C, h, w)``, ``(B,)``, ``(B, L, D)`` with B = ``unet_batch_size`` (SDXL's
        added inputs: ``extensions["sdxl"].conditioning()``).
        """
        latents, timesteps = self.batch.unet_inputs()
        return latents, timesteps, self.layout.unet_embeddings

    @property
    def current_positive(self) -> torch.Tensor:
        """The positive embedding ``(1, L, D)`` in use now (mid-crossfade: the mix)."""
        return self.layout.current_positive

    def set_reference_tokens(self, tokens: torch.Tensor) -> None:
        """Steer by ``tokens`` ``(1, T, D)``: the IP-Adapter image tokens of the newest frame of
        ``model.ip_adapter.source``, encoded off the frame loop (``engine.runtime.reference_source``);
        called between two frames. They stay the reference for later prompt changes."""
        adapter = self.extensions.get("ip_adapter")
        if not isinstance(adapter, IpAdapter) or not self.settings.ip_adapter_from_source:
            raise ValueError("set_reference_tokens needs model.ip_adapter with a source")
        self.layout.positive = adapter.with_reference(tokens, self.layout.positive, self.state)
        previous, progress = self.layout.transition or (None, 1.0)  # a running crossfade goes on
        self.set_prompt_transition(previous, progress)

    def set_prompt_transition(self, previous: torch.Tensor | None, progress: float) -> None:
        """Crossfade from ``previous`` to the current prompt: ``slerp(previous, target, progress)``;
        called by the runtime once per frame while a ``/prompt s f`` crossfade runs (no encoding).
        ``previous=None`` or ``progress >= 1`` ends it."""
        size = (self.height, self.width)
        self.layout.crossfade(previous, progress, self.batch.cfg_type, self.batch.n, size)

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
    def _noise(
        self, state: Mapping[str, Any], n: int, latent_shape: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        """Cached per-slot noise ``(n, C, h, w)`` from the seed or the seed blend (CPU RNG)."""
        seeds = state["seed_blend"] or [(state["seed"], 1.0)]
        method = BlendMethod(state["prompt_blend_method"])
        noise = seeded_noise(seeds, method, (n, *(latent_shape or self.latent_shape)))
        return noise.to(device=self.device, dtype=self.dtype)

    def unet_shape(
        self,
        n: int | None = None,
        cfg_type: CfgType | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> UNetShape:
        """The fixed UNet shapes of the current (or a proposed) n, cfg mode, latent size and
        state (what the extensions add)."""
        n = self.batch.n if n is None else n
        cfg_type = self.batch.cfg_type if cfg_type is None else cfg_type
        latent_shape = latent_shape or self.latent_shape
        state = self.state if state is None else state
        fields = shape_fields(self.extensions.values(), state, n, cfg_type, latent_shape)
        channels, height, width = latent_shape
        return UNetShape(
            batch=unet_batch_size(cfg_type, n),
            latent_channels=channels,
            latent_height=height,
            latent_width=width,
            text_length=int(self.layout.unet_embeddings.shape[1]),
            text_dim=int(self.layout.unet_embeddings.shape[2]),
            image_scale=self.models.vae_scale_factor,
            **fields,
        )

    def vae_shape(self, width: int | None = None, height: int | None = None) -> VaeShape:
        """The fixed VAE shapes of the current (or a proposed) output size."""
        return VaeShape(
            height=self.height if height is None else height,
            width=self.width if width is None else width,
            latent_channels=self.models.latent_channels,
            scale_factor=self.models.vae_scale_factor,
        )
