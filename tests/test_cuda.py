"""On a CUDA GPU (skipped elsewhere): the hot path never syncs the host; float16 agrees with float32."""

from __future__ import annotations

import pytest
import torch

from engine.models.loader import ModelRequest, load_models
from engine.pipeline import PipelineSettings, StreamPipeline
from engine.stream.modes import CfgType

pytestmark = [
    pytest.mark.sdk,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU"),
]

SIZE = 128


def _frames(count: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    base = torch.rand((1, 3, SIZE, SIZE), generator=g) * 2 - 1
    return [torch.roll(base, 3 * k, dims=3).to(device, dtype) for k in range(count)]


def _pipeline(dtype: str, cfg: CfgType = CfgType.SELF) -> StreamPipeline:
    models = load_models(ModelRequest(id="builtin:tiny", device="cuda", dtype=dtype))
    settings = PipelineSettings(
        width=SIZE, height=SIZE, t_index_list=[32, 45], cfg_type=cfg, guidance_scale=1.4, prompt="neon"
    )
    return StreamPipeline(models, settings)


@pytest.mark.parametrize("cfg", [CfgType.SELF, CfgType.FULL, CfgType.ONETIME])
def test_steady_frames_make_no_host_sync(cfg: CfgType) -> None:
    """DESIGN.md's hot-path rule, checked by CUDA itself: after warm-up, a frame (encode, one
    UNet call, the stream step, decode) queues work without a single synchronizing call."""
    pipe = _pipeline("float16", cfg)
    frames = _frames(8, "cuda", torch.float16)
    for frame in frames[:3]:
        pipe(frame)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = [pipe(frame) for frame in frames[3:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(out is not None and out.shape == (1, 3, SIZE, SIZE) for out in outputs)


def test_float16_output_is_finite_and_follows_float32() -> None:
    half, full = _pipeline("float16"), _pipeline("float32")
    out_half = [half(frame) for frame in _frames(6, "cuda", torch.float16)][-1]
    out_full = [full(frame) for frame in _frames(6, "cuda", torch.float32)][-1]
    assert out_half is not None and out_full is not None
    assert torch.isfinite(out_half).all()
    difference = (out_half.float() - out_full).abs()
    assert float(difference.mean()) < 0.02, float(difference.mean())
    assert float(difference.max()) < 0.25, float(difference.max())
