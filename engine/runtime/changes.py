"""One live change whose runners are ready: plan → LoRA weights → commit → release what is dropped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.accel.backends import Backend
from engine.models.bundle import ModelBundle
from engine.models.lora import rescale_bundle
from engine.pipeline import BuildTarget, PipelineSettings, Runners, StreamPipeline


def open_pipeline(
    models: ModelBundle, settings: PipelineSettings | None = None, backend: Backend | None = None
) -> StreamPipeline:
    """A StreamPipeline on ``backend``'s runners for its start-up shapes (torch eager: ``None``).

    May export or build for minutes when the backend has no engine of those shapes yet.
    """
    pipeline = StreamPipeline(models, settings)
    if backend is not None:
        vae = backend.prepare_vae(pipeline.vae_shape())
        pipeline.runners = Runners(backend.prepare_unet(pipeline.unet_shape()), vae)
    return pipeline


def ready_runners(pipeline: StreamPipeline, backend: Backend, target: BuildTarget) -> Runners | None:
    """The runners of ``target`` when the backend has them loaded (``None``: they must be built)."""
    unet = backend.unet_for(target.unet)
    vae = pipeline.runners.vae if target.vae is None else backend.vae_for(target.vae)
    if unet is None or vae is None:
        return None
    return Runners(unet, vae)


def apply_change(
    pipeline: StreamPipeline, changes: Mapping[str, Any], backend: Backend | None = None
) -> dict[str, Any]:
    """Plan ``changes``, move the LoRA weights, commit between two frames; returns what to echo.

    Without a backend the pipeline's own (torch) runners serve every shape. With one, the
    runners of a new shape must be loaded already (``ready_runners``; the engine builds them in
    the background first). The previous shapes stay loaded for a quick way back; older ones are
    closed.

    Raises:
        ParamError: a refused value or a refused LoRA change; nothing changed.
        RuntimeError: the runners of the new shapes are not loaded.
    """
    plan = pipeline.plan(changes)
    runners = None
    if plan.target is not None and backend is not None:
        runners = ready_runners(pipeline, backend, plan.target)
        if runners is None:
            raise RuntimeError(f"the runners for {plan.target.label} are not built yet")
    pipeline.check_commit(plan, runners)  # before the weights move
    if plan.lora is not None:
        if backend is None:
            rescale_bundle(pipeline.models, plan.lora.old, plan.lora.new)
        else:
            backend.set_lora_scales(plan.lora.old, plan.lora.new)
    before = (pipeline.unet_shape(), pipeline.vae_shape())
    accepted = pipeline.commit(plan, runners)
    if plan.target is not None and backend is not None:
        backend.retain({before[0], plan.unet_shape}, {before[1], plan.vae_shape})
    return accepted
