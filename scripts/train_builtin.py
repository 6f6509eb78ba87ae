"""Train ``builtin:shapes`` and its judge from procedural drawings (hours on a CPU; not in CI).

Phases, each resumable from its own files in ``--work`` (a finished phase is skipped):

1. ``judge``  a small classifier of pattern and dominant colours (engine/judge/classifier.py).
2. ``vae``    the TAESD-layout autoencoder on 64x64 crops of 128x128 pictures, until the
              held-out drawings reach ``--vae-psnr`` dB or ``--vae-steps`` run out; then the
              latent scale is measured so that scaled latents have unit variance
              (checkpoints every 250 steps).
3. ``pool``   a fixed pool of (input latent, target latent, caption) examples: drawings with
              their captions, and pictures unlike the drawings (the engine's test pattern,
              photo-like noise, other drawings) whose target is what the caption asks for
              (the picture tinted for a colour alone, else the drawing), so that a prompt
              learns to override its img2img input.
4. ``unet``   UNet + text encoder, epsilon prediction on the builtin's LCM/SD schedule with
              timesteps weighted toward those the engine uses (99, 359, 679, 999), 10 % empty
              captions for guidance, an EMA of the weights; checkpoints every 200 steps.
5. ``decoder`` the decoder alone, longer, on the frozen encoder (the latent space the UNet
              learned stays the same), for sharper pictures.
6. ``export`` the EMA weights (float16) to engine/models/weights/shapes.safetensors and the
              judge to engine/judge/weights/judge.safetensors, with their SHA-256.

    OMP_WAIT_POLICY=PASSIVE python scripts/train_builtin.py --work train-work

The loss curve of every phase is appended to ``<work>/loss.csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no spinning threads on a shared CPU

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

from bridges.pattern import PatternSource  # noqa: E402
from engine.imageops import frame_to_tensor  # noqa: E402
from engine.judge.classifier import JUDGE_WEIGHTS, Judge  # noqa: E402
from engine.judge.drawings import (  # noqa: E402
    COLOR_NAMES,
    PATTERNS,
    caption,
    random_drawing,
    render,
    smooth_noise,
    tint,
)
from engine.models import trained  # noqa: E402
from engine.models.tiny import load_tiny_tokenizer  # noqa: E402

SIZE = trained.SHAPES_SIZE
ENGINE_TIMESTEPS = (99, 359, 679, 999)
OVERRIDE_MIN_T = 250


def log_row(
    work: Path, phase: str, step: int, loss: float, lr: float, started: float, extra: str = ""
) -> None:
    path = work / "loss.csv"
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["phase", "step", "loss", "lr", "elapsed_s", "extra"])
        writer.writerow([phase, step, f"{loss:.6f}", f"{lr:.2e}", f"{time.monotonic() - started:.1f}", extra])


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- pictures -------------------------------------------------------------------------------


class Foreign:
    """Pictures unlike the drawings: the engine's own test pattern and photo-like noise."""

    def __init__(self) -> None:
        self.pattern = PatternSource(fps=30.0, width=SIZE, height=SIZE)

    def picture(self, rng: random.Random) -> torch.Tensor:
        """``(3, SIZE, SIZE)`` in [0, 1]."""
        if rng.random() < 0.6:
            rgba = torch.from_numpy(self.pattern.render(rng.randrange(0, 200_000)))
            return (frame_to_tensor(rgba, SIZE, SIZE)[0] + 1.0) / 2.0
        return smooth_noise(SIZE, rng)


def judge_example(rng: random.Random, foreign: Foreign) -> tuple[torch.Tensor, int, torch.Tensor]:
    """A picture, its pattern index (-1: none) and its dominant-colour targets ``(10,)``."""
    colors = torch.zeros(len(COLOR_NAMES))
    kind = rng.random()
    if kind < 0.7:
        drawing = random_drawing(rng)
        for name in drawing.colors:
            colors[COLOR_NAMES.index(name)] = 1.0
        return render(drawing, SIZE, rng), PATTERNS.index(drawing.pattern), colors
    picture = foreign.picture(rng)
    if kind < 0.85:
        name = rng.choice(COLOR_NAMES)
        colors[COLOR_NAMES.index(name)] = 1.0
        return tint(picture, name, rng), -1, colors
    return picture, -1, colors  # many colours: none dominates


def degrade(images: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Blur and grain like a small model's output, so the judge reads generated pictures."""
    if rng.random() < 0.5:
        k = rng.choice([3, 5, 7])
        images = F.avg_pool2d(images, k, stride=1, padding=k // 2, count_include_pad=False)
    return (images + torch.randn_like(images) * rng.uniform(0.0, 0.08)).clamp(0.0, 1.0)


# ---- phase 1: judge -------------------------------------------------------------------------


def train_judge(work: Path, steps: int, seed: int, started: float) -> None:
    target = work / "judge.safetensors"
    if target.exists():
        print(f"judge: done ({target})")
        return
    rng = random.Random(seed + 1)
    torch.manual_seed(seed + 1)
    foreign = Foreign()
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    batch = 96
    for step in tqdm(range(steps), desc="judge", unit="step"):
        examples = [judge_example(rng, foreign) for _ in range(batch)]
        images = degrade(torch.stack([e[0] for e in examples]), rng)
        patterns = torch.tensor([e[1] for e in examples])
        colors = torch.stack([e[2] for e in examples])
        lr = cosine_lr(step, steps, 2e-3, warmup=50)
        set_lr(optimizer, lr)
        pattern_logits, color_logits = judge(images)
        loss = F.cross_entropy(
            pattern_logits, patterns, ignore_index=-1
        ) + F.binary_cross_entropy_with_logits(color_logits, colors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log_row(work, "judge", step, loss.item(), lr, started)
    judge.eval()
    held = random.Random(seed + 1001)
    correct_pattern = correct_colors = total = 0
    with torch.no_grad():
        for _ in range(8):
            examples = []
            while len(examples) < 64:
                drawing = random_drawing(held)
                examples.append((render(drawing, SIZE, held), drawing))
            images = degrade(torch.stack([e[0] for e in examples]), held)
            pattern_logits, color_logits = judge(images)
            for row, (_, drawing) in enumerate(examples):
                correct_pattern += int(PATTERNS[int(pattern_logits[row].argmax())] == drawing.pattern)
                top = {COLOR_NAMES[int(i)] for i in color_logits[row].topk(len(drawing.colors)).indices}
                correct_colors += int(top == set(drawing.colors))
                total += 1
    extra = f"held-out pattern acc {correct_pattern / total:.3f}, colours acc {correct_colors / total:.3f}"
    print("judge:", extra)
    log_row(work, "judge-eval", steps, 0.0, 0.0, started, extra)
    save_file(judge.state_dict(), str(target))


# ---- phase 2: autoencoder -------------------------------------------------------------------


def vae_picture(rng: random.Random, foreign: Foreign) -> torch.Tensor:
    if rng.random() < 0.75:
        return render(random_drawing(rng), SIZE, rng)
    return foreign.picture(rng)


def crops(rng: random.Random, foreign: Foreign, batch: int, crop: int) -> torch.Tensor:
    """``batch`` random ``crop``-sized pieces (8-pixel aligned) of autoencoder pictures, in [-1, 1]."""
    pictures = []
    for _ in range(batch):
        picture = vae_picture(rng, foreign)
        y, x = rng.randrange(0, SIZE - crop + 1, 8), rng.randrange(0, SIZE - crop + 1, 8)
        pictures.append(picture[:, y : y + crop, x : x + crop])
    return torch.stack(pictures) * 2 - 1


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def save_state(
    path: Path, module: Any, optimizer: torch.optim.Optimizer, rng: random.Random, step: int, **extra: Any
) -> None:
    """A resumable checkpoint (module, optimizer, both RNGs, step), written then renamed."""
    state = {
        "module": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        **extra,
    }
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def resume(
    path: Path, module: Any, optimizer: torch.optim.Optimizer, rng: random.Random
) -> dict[str, Any] | None:
    """Load ``save_state``'s checkpoint into ``module``, ``optimizer`` and the RNGs (None: none yet)."""
    if not path.exists():
        return None
    state: dict[str, Any] = torch.load(path)
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    print(f"{path.stem}: resumed at step {state['step']}")
    return state


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def build_vae() -> Any:
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(**trained.SHAPES_TAESD_CONFIG)


def held_out_drawings(seed: int, count: int = 64) -> torch.Tensor:
    rng = random.Random(seed + 2002)
    return torch.stack([render(random_drawing(rng), SIZE, rng) for _ in range(count)])


def vae_roundtrip(vae: Any, images01: torch.Tensor) -> torch.Tensor:
    latents = vae.encoder(images01 * 2 - 1)
    return (vae.decoder(latents) + 1) / 2


def train_vae(work: Path, steps: int, target_psnr: float, seed: int, started: float) -> None:
    done = work / "vae.safetensors"
    if done.exists():
        print(f"vae: done ({done})")
        return
    rng = random.Random(seed + 2)
    torch.manual_seed(seed + 2)
    foreign = Foreign()
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    held = held_out_drawings(seed)
    batch, crop = 24, 64
    best, first = 0.0, 0
    state = resume(work / "vae.pt", vae, optimizer, rng)
    if state is not None:
        first, best = state["step"], state["psnr"]
    bar = tqdm(range(first, steps), desc="vae", unit="step", initial=first, total=steps)
    for step in bar:
        images = crops(rng, foreign, batch, crop)
        lr = cosine_lr(step, steps, 2e-3, warmup=100)
        set_lr(optimizer, lr)
        latents = vae.encoder(images)
        # Latents a little noisy at the decoder (the UNet's are never exact), kept inside the
        # decoder's tanh range.
        decoded = vae.decoder(latents + 0.05 * torch.randn_like(latents))
        loss = F.mse_loss(decoded, images) + 0.5 * F.l1_loss(decoded, images)
        loss = loss + 0.01 * F.relu(latents.abs() - 2.5).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        extra = ""
        if step % 250 == 0 or step == steps - 1:
            vae.eval()
            with torch.no_grad():
                best = psnr(vae_roundtrip(vae, held), held)
            vae.train()
            extra = f"held-out psnr {best:.2f} dB"
            bar.set_postfix_str(extra)
        if step % 50 == 0 or extra:
            log_row(work, "vae", step, loss.item(), lr, started, extra)
        if extra:
            save_state(work / "vae.pt", vae, optimizer, rng, step + 1, psnr=best)
        if best >= target_psnr and step > steps // 3:
            print(f"vae: {best:.2f} dB at step {step} (target {target_psnr})")
            break
    vae.eval()
    with torch.no_grad():
        final = psnr(vae_roundtrip(vae, held), held)
        scale_rng = random.Random(seed + 3003)
        sample = torch.stack([vae_picture(scale_rng, foreign) for _ in range(128)])
        std = float(vae.encoder(sample * 2 - 1).std())
    print(f"vae: held-out PSNR {final:.2f} dB; latent std {std:.3f} → scaling factor {1 / std:.4f}")
    log_row(work, "vae-eval", step, 0.0, 0.0, started, f"held-out psnr {final:.2f} dB, latent std {std:.4f}")
    save_file(
        vae.state_dict(), str(done), metadata={"scaling_factor": f"{1.0 / std:.6f}", "psnr": f"{final:.3f}"}
    )


def load_vae(work: Path, tuned: bool = False) -> tuple[Any, float]:
    """The trained autoencoder and its latent scale (``tuned``: with the fine-tuned decoder, if any)."""
    from safetensors import safe_open

    path = work / "vae.safetensors"
    vae = build_vae()
    vae.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as handle:
        scale = float(handle.metadata()["scaling_factor"])
    if tuned and (work / "decoder.safetensors").exists():
        vae.decoder.load_state_dict(load_file(str(work / "decoder.safetensors")))
    vae.eval().requires_grad_(False)
    return vae, scale


def tune_decoder(work: Path, steps: int, seed: int, started: float) -> None:
    """The decoder alone, longer, on the frozen encoder's latents: sharper pictures from the
    same latent space (the UNet trained on it stays valid). Checkpoints every 250 steps."""
    done = work / "decoder.safetensors"
    if done.exists():
        print(f"decoder: done ({done})")
        return
    rng = random.Random(seed + 6)
    torch.manual_seed(seed + 6)
    foreign = Foreign()
    vae, _scale = load_vae(work)
    decoder = vae.decoder
    decoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3, weight_decay=0.0)
    held = held_out_drawings(seed)
    checkpoint, first, batch, crop = work / "decoder.pt", 0, 24, 64
    state = resume(checkpoint, decoder, optimizer, rng)
    if state is not None:
        first = state["step"]
    bar = tqdm(range(first, steps), desc="decoder", unit="step", initial=first, total=steps)
    for step in bar:
        images = crops(rng, foreign, batch, crop)
        lr = cosine_lr(step, steps, 1e-3, warmup=50)
        set_lr(optimizer, lr)
        with torch.no_grad():
            latents = vae.encoder(images)
        decoded = decoder(latents + 0.03 * torch.randn_like(latents))
        loss = F.mse_loss(decoded, images) + 0.5 * F.l1_loss(decoded, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimizer.step()
        extra = ""
        if step % 250 == 0 or step == steps - 1:
            decoder.eval()
            with torch.no_grad():
                extra = f"held-out psnr {psnr(vae_roundtrip(vae, held), held):.2f} dB"
            decoder.train()
            bar.set_postfix_str(extra)
            save_state(checkpoint, decoder, optimizer, rng, step + 1)
        if step % 50 == 0 or extra:
            log_row(work, "decoder", step, loss.item(), lr, started, extra)
    print(f"decoder: {extra}")
    save_file(decoder.state_dict(), str(done))


# ---- phase 3: the pool ----------------------------------------------------------------------


def pool_example(rng: random.Random, foreign: Foreign) -> tuple[torch.Tensor, torch.Tensor | None, str, int]:
    """(input picture, target picture or None if the same, caption, kind 0 plain / 1 override)."""
    kind = rng.random()
    drawing = random_drawing(rng)
    text = caption(drawing, rng)
    if kind < 0.62:
        return render(drawing, SIZE, rng), None, text, 0
    if kind < 0.67:  # the unconditional branch knows pictures unlike the drawings too
        return foreign.picture(rng), None, "", 0
    source = foreign.picture(rng) if rng.random() < 0.75 else render(random_drawing(rng), SIZE, rng)
    target = (
        tint(source, drawing.fg, rng)
        if drawing.pattern == "solid" and drawing.style is None
        else render(drawing, SIZE, rng)
    )
    return source, target, text, 1


def build_pool(work: Path, count: int, seed: int, started: float) -> None:
    done = work / "pool.pt"
    if done.exists():
        print(f"pool: done ({done})")
        return
    rng = random.Random(seed + 4)
    foreign = Foreign()
    vae, scale = load_vae(work)
    tokenizer = load_tiny_tokenizer()
    inputs, targets, kinds, captions = [], [], [], []
    batch = 64
    with torch.no_grad():
        for _ in tqdm(range(0, count, batch), desc="pool", unit="batch"):
            examples = [pool_example(rng, foreign) for _ in range(batch)]
            sources = torch.stack([e[0] for e in examples]) * 2 - 1
            z_in = vae.encoder(sources) * scale
            z_target = z_in.clone()
            override = [i for i, e in enumerate(examples) if e[1] is not None]
            if override:
                wanted = torch.stack([examples[i][1] for i in override]) * 2 - 1  # type: ignore[misc]
                z_target[override] = vae.encoder(wanted) * scale
            inputs.append(z_in.half())
            targets.append(z_target.half())
            kinds += [e[3] for e in examples]
            captions += [e[2] for e in examples]
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    torch.save(
        {
            "inputs": torch.cat(inputs),
            "targets": torch.cat(targets),
            "kinds": torch.tensor(kinds),
            "ids": ids.short(),
            "captions": captions,
        },
        done,
    )
    log_row(work, "pool", len(captions), 0.0, 0.0, started, f"{sum(kinds)} override examples")


# ---- phase 4: UNet + text encoder -----------------------------------------------------------


def alphas_cumprod() -> torch.Tensor:
    from engine.models.scheduler import SD_BETA_END, SD_BETA_START, SD_NUM_TRAIN_TIMESTEPS

    betas = torch.linspace(SD_BETA_START**0.5, SD_BETA_END**0.5, SD_NUM_TRAIN_TIMESTEPS) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sample_timesteps(kinds: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Half near the engine's timesteps (±15), half uniform; override examples from 250 up."""
    count = kinds.numel()
    near = torch.tensor(ENGINE_TIMESTEPS)[torch.randint(0, len(ENGINE_TIMESTEPS), (count,), generator=rng)]
    near = (near + torch.randint(-15, 16, (count,), generator=rng)).clamp(0, 999)
    uniform = torch.randint(0, 1000, (count,), generator=rng)
    t = torch.where(torch.rand(count, generator=rng) < 0.5, near, uniform)
    lifted = OVERRIDE_MIN_T + (t.float() / 999 * (999 - OVERRIDE_MIN_T)).long()
    return torch.where(kinds == 1, torch.maximum(t, lifted), t)


def build_unet_and_text() -> tuple[Any, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return UNet2DConditionModel(**trained.SHAPES_UNET_CONFIG), CLIPTextModel(
        CLIPTextConfig(**trained.SHAPES_TEXT_CONFIG)
    )


def train_unet(work: Path, steps: int, batch: int, seed: int, started: float) -> None:
    checkpoint = work / "unet.pt"
    pool = torch.load(work / "pool.pt")
    inputs, targets = pool["inputs"].float(), pool["targets"].float()
    kinds, ids = pool["kinds"], pool["ids"].long()
    empty_ids = load_tiny_tokenizer()(
        [""], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    unet, text = build_unet_and_text()
    params = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)
    ema = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    ema.update({f"text_encoder.{k}": v.detach().clone() for k, v in text.state_dict().items()})
    start = 0
    generator = torch.Generator().manual_seed(seed + 5)
    if checkpoint.exists():
        state = torch.load(checkpoint)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        optimizer.load_state_dict(state["optimizer"])
        ema = state["ema"]
        start = state["step"]
        generator.set_state(state["generator"])
        print(f"unet: resumed at step {start}")
    if start >= steps:
        print("unet: done")
        return
    abar = alphas_cumprod()
    unet.train()
    text.train()
    bar = tqdm(range(start, steps), desc="unet", unit="step", initial=start, total=steps)
    running = None
    for step in bar:
        index = torch.randint(0, kinds.numel(), (batch,), generator=generator)
        z_in, z_target, kind = inputs[index], targets[index], kinds[index]
        tokens = ids[index].clone()
        drop = torch.rand(batch, generator=generator) < 0.1
        tokens[drop] = empty_ids
        t = sample_timesteps(kind, generator)
        a = abar[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
        noise = torch.randn(z_in.shape, generator=generator)
        x_t = a * z_in + b * noise
        eps_target = (x_t - a * z_target) / b  # = noise where input and target agree
        lr = cosine_lr(step, steps, 3e-4)
        set_lr(optimizer, lr)
        embeddings = text(tokens)[0]
        predicted = unet(x_t, t, embeddings).sample
        weights = (abar[t] / (1 - abar[t])).clamp(max=5.0) / (abar[t] / (1 - abar[t]))  # min-SNR-5
        loss = (weights.view(-1, 1, 1, 1) * (predicted - eps_target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for prefix, module in (("unet.", unet), ("text_encoder.", text)):
                for key, value in module.state_dict().items():
                    ema[prefix + key].mul_(decay).add_(value.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if step % 50 == 0:
            log_row(work, "unet", step, running, lr, started)
        if (step + 1) % 200 == 0 or step + 1 == steps:
            torch.save(
                {
                    "unet": unet.state_dict(),
                    "text": text.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "ema": ema,
                    "step": step + 1,
                    "generator": generator.get_state(),
                },
                work / "unet.tmp",
            )
            os.replace(work / "unet.tmp", checkpoint)


# ---- phase 5: export ------------------------------------------------------------------------


def export(work: Path) -> None:
    state = torch.load(work / "unet.pt")
    vae, scale = load_vae(work, tuned=True)
    tensors = {key: value.half().contiguous() for key, value in state["ema"].items()}
    tensors.update({f"vae.{k}": v.half().contiguous() for k, v in vae.state_dict().items()})
    trained.SHAPES_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors,
        str(trained.SHAPES_WEIGHTS),
        metadata={"vae_scaling_factor": f"{scale:.6f}", "unet_steps": str(state["step"])},
    )
    JUDGE_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(work / "judge.safetensors")), str(JUDGE_WEIGHTS))
    for path in (trained.SHAPES_WEIGHTS, JUDGE_WEIGHTS):
        print(
            f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e6:.1f} MB sha256 {trained.file_sha256(path)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT / "train-work", help="checkpoints, pool and loss.csv"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--judge-steps", type=int, default=600)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument(
        "--vae-psnr", type=float, default=27.0, help="stop the autoencoder early at this PSNR"
    )
    parser.add_argument("--pool", type=int, default=24_000, help="examples in the UNet's pool")
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=1500, help="decoder fine-tuning steps")
    parser.add_argument("--phases", default="judge,vae,pool,unet,decoder,export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    phases = args.phases.split(",")
    if "judge" in phases:
        train_judge(args.work, args.judge_steps, args.seed, started)
    if "vae" in phases:
        train_vae(args.work, args.vae_steps, args.vae_psnr, args.seed, started)
    if "pool" in phases:
        build_pool(args.work, args.pool, args.seed, started)
    if "unet" in phases:
        train_unet(args.work, args.unet_steps, args.batch, args.seed, started)
    if "decoder" in phases:
        tune_decoder(args.work, args.decoder_steps, args.seed, started)
    if "export" in phases:
        export(args.work)
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
