"""IP-Adapter: a CLIP image encoder, its projection to image tokens, and the attn2 layers that read them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from engine.models.errors import ModelLoadError, short_reason
from engine.models.ip_attention import IpAttnProcessor, PlainAttnProcessor
from engine.models.sources import TINY_IP_ADAPTER_ID, local_path, looks_like_hub_id

logger = logging.getLogger(__name__)

IP_ACCEPTED = (
    "Give a .bin/.safetensors file in the h94/IP-Adapter layout (a local path, or a hub file such as "
    f"h94/IP-Adapter/models/ip-adapter_sd15.safetensors), or {TINY_IP_ADAPTER_ID}. Only the plain "
    "IP-Adapter (4 image tokens) is supported; Plus and FaceID are not."
)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError)


@dataclass
class IpAdapter:
    """The parts of an IP-Adapter beside the UNet.

    Attributes:
        image_encoder: ``CLIPVisionModelWithProjection``; ``image_embeds`` ``(N, E)``.
        image_projection: diffusers ``ImageProjection``: ``(N, E)`` → ``(N, T, D)`` tokens.
        processors: the ``IpAttnProcessor`` of each attn2 layer, by processor name.
        num_tokens: T, the image tokens appended to the text embeddings.
        image_size: the encoder's input side (224 for real CLIP).
        identity: facts for engine cache keys.
    """

    image_encoder: Any
    image_projection: Any
    processors: dict[str, IpAttnProcessor]
    num_tokens: int
    image_size: int
    identity: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] → image tokens ``(N, T, D)`` (device/dtype of the parts)."""
        weight = next(self.image_projection.parameters())
        x = ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        mean = torch.tensor(_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_CLIP_STD, device=x.device).view(1, 3, 1, 1)
        pixels = ((x - mean) / std).to(device=weight.device, dtype=weight.dtype)
        embeds = self.image_encoder(pixel_values=pixels).image_embeds
        return self.image_projection(embeds)

    @torch.inference_mode()
    def unconditional_tokens(self) -> torch.Tensor:
        """Tokens of a zero image embedding ``(1, T, D)``: the negative side of guidance (as diffusers)."""
        weight = next(self.image_projection.parameters())
        width = self.image_projection.image_embeds.in_features
        return self.image_projection(torch.zeros((1, width), device=weight.device, dtype=weight.dtype))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> IpAdapter:
        for module in (self.image_encoder, self.image_projection, *self.processors.values()):
            module.to(device=device, dtype=dtype)
        return self


def _attn2_layers(unet: Any) -> list[tuple[str, Any]]:
    """``(processor name, Attention module)`` of every cross-attention layer, in processor order."""
    return [
        (name, unet.get_submodule(name.removesuffix(".processor")))
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    ]


def _processors(unet: Any, num_tokens: int) -> dict[str, IpAttnProcessor]:
    return {
        name: IpAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, num_tokens)
        for name, attn in _attn2_layers(unet)
    }


def build_tiny_ip_adapter(unet: Any, seed: int = 0) -> IpAdapter:
    """A random IP-Adapter for any ``UNet2DConditionModel`` (``builtin:tiny-ip-adapter``): a tiny
    CLIP vision encoder (32² input), 4 tokens. Seeded; the global RNG is untouched; CPU float32."""
    from diffusers.models.embeddings import ImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(config)
        projection = ImageProjection(32, int(unet.config.cross_attention_dim), 4)
        processors = _processors(unet, 4)
    adapter = IpAdapter(encoder, projection, processors, 4, 32, {"id": TINY_IP_ADAPTER_ID, "seed": seed})
    _freeze(adapter)
    return adapter


def _freeze(adapter: IpAdapter) -> None:
    for module in (adapter.image_encoder, adapter.image_projection, *adapter.processors.values()):
        module.eval().requires_grad_(False)


def load_ip_adapter(
    source: str,
    unet: Any,
    device: torch.device,
    dtype: torch.dtype,
    image_encoder: str | None = None,
    *,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> IpAdapter:
    """The IP-Adapter ``source`` for ``unet`` (see ``IP_ACCEPTED``), on ``device`` in ``dtype``.

    Raises:
        ModelLoadError: naming ``source`` and what is accepted.
    """
    name = source.strip()
    if name == TINY_IP_ADAPTER_ID:
        return build_tiny_ip_adapter(unet).to(device, dtype)
    if name.startswith("builtin:"):
        raise ModelLoadError(f"unknown builtin IP-Adapter {source!r}. {IP_ACCEPTED}")
    try:
        weights_file, encoder_source, subfolder = _locate(name, image_encoder, cache_dir, local_files_only)
        state = _read_state(weights_file)
        adapter = from_state_dict(
            state, unet, _load_encoder(encoder_source, subfolder, cache_dir, local_files_only)
        )
    except ModelLoadError:
        raise
    except _LOAD_ERRORS as err:
        raise ModelLoadError(
            f"IP-Adapter {source!r} could not be loaded (offline?): {short_reason(err)}. {IP_ACCEPTED}"
        ) from err
    stat = weights_file.stat()
    adapter.identity = {"id": name, "size": stat.st_size, "mtime": int(stat.st_mtime)}
    return adapter.to(device, dtype)


def _locate(
    name: str, image_encoder: str | None, cache_dir: str | None, local_files_only: bool
) -> tuple[Path, str, str | None]:
    """The weights file, and where its image encoder is (a folder or hub repo, and a subfolder)."""
    path = local_path(name)
    if path.is_file():
        return path, image_encoder or str(path.parent / "image_encoder"), None
    parts = name.split("/")
    hub_file = len(parts) >= 3 and looks_like_hub_id("/".join(parts[:2]))
    if not hub_file or not name.endswith((".bin", ".safetensors")):
        raise ModelLoadError(f"IP-Adapter {name!r} is not an existing file nor a hub file. {IP_ACCEPTED}")
    from huggingface_hub import hf_hub_download

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    downloaded = hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=local_files_only)
    if image_encoder is not None:
        return Path(downloaded), image_encoder, None
    return Path(downloaded), repo, "/".join([*parts[2:-1], "image_encoder"])


def _read_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, tensor in flat.items():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = tensor
        return state
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    return {"image_proj": dict(loaded["image_proj"]), "ip_adapter": dict(loaded["ip_adapter"])}


def _load_encoder(source: str, subfolder: str | None, cache_dir: str | None, local_files_only: bool) -> Any:
    from transformers import CLIPVisionModelWithProjection

    options: dict[str, Any] = {"cache_dir": cache_dir, "local_files_only": local_files_only}
    if subfolder:
        options["subfolder"] = subfolder
    return CLIPVisionModelWithProjection.from_pretrained(source, **options)


def from_state_dict(state: dict[str, dict[str, torch.Tensor]], unet: Any, image_encoder: Any) -> IpAdapter:
    """An IpAdapter from the h94 layout: ``image_proj`` {proj.weight, proj.bias, norm.weight,
    norm.bias} and ``ip_adapter`` {"1.to_k_ip.weight", "1.to_v_ip.weight", "3...."}, numbered over
    the UNet's attention processors (the odd ones are attn2), as diffusers reads it."""
    from diffusers.models.embeddings import ImageProjection

    projection_state = state["image_proj"]
    if "proj.weight" not in projection_state:
        raise ModelLoadError(
            f"IP-Adapter image projection has keys {sorted(projection_state)[:4]}; not supported: "
            f"only the plain IP-Adapter. {IP_ACCEPTED}"
        )
    width = int(unet.config.cross_attention_dim)
    out_features, embed_dim = projection_state["proj.weight"].shape
    tokens = out_features // width
    projection = ImageProjection(embed_dim, width, tokens)
    projection.load_state_dict(
        {
            "image_embeds.weight": projection_state["proj.weight"],
            "image_embeds.bias": projection_state["proj.bias"],
            "norm.weight": projection_state["norm.weight"],
            "norm.bias": projection_state["norm.bias"],
        }
    )
    processors = _processors(unet, tokens)
    for index, processor in enumerate(processors.values()):
        key = 1 + 2 * index
        processor.to_k_ip.weight.data.copy_(state["ip_adapter"][f"{key}.to_k_ip.weight"])
        processor.to_v_ip.weight.data.copy_(state["ip_adapter"][f"{key}.to_v_ip.weight"])
    size = int(image_encoder.config.image_size)
    adapter = IpAdapter(image_encoder, projection, processors, tokens, size)
    _freeze(adapter)
    return adapter


def to_state_dict(adapter: IpAdapter) -> dict[str, dict[str, torch.Tensor]]:
    """The h94 layout of ``adapter`` (the inverse of ``from_state_dict``)."""
    projection = adapter.image_projection
    ip = {}
    for index, processor in enumerate(adapter.processors.values()):
        key = 1 + 2 * index
        ip[f"{key}.to_k_ip.weight"] = processor.to_k_ip.weight.detach().clone()
        ip[f"{key}.to_v_ip.weight"] = processor.to_v_ip.weight.detach().clone()
    return {
        "image_proj": {
            "proj.weight": projection.image_embeds.weight.detach().clone(),
            "proj.bias": projection.image_embeds.bias.detach().clone(),
            "norm.weight": projection.norm.weight.detach().clone(),
            "norm.bias": projection.norm.bias.detach().clone(),
        },
        "ip_adapter": ip,
    }


def install_ip_adapter(unet: Any, adapter: IpAdapter) -> None:
    """Route every attn2 layer of ``unet`` through the adapter's ``IpAttnProcessor``; plain attn1
    layers take ``PlainAttnProcessor`` (the same math, and no warning about ``ip_scale``); other
    attn1 processors (cross-frame attention) are kept."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors: dict[str, Any] = {}
    for name, current in unet.attn_processors.items():
        if name in adapter.processors:
            processors[name] = adapter.processors[name]
        elif type(current) is AttnProcessor2_0:
            processors[name] = PlainAttnProcessor()
        else:
            processors[name] = current
    unet.set_attn_processor(processors)
