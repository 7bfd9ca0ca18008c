#!/usr/bin/env python3
"""Train the small LoRA adapters of shapes-flux (models/shapes-flux-loras/) on a CPU in minutes, check them with
the pixel analyser, and draw the before/after figure of docs/lora.md.

    blue-shift        "red" renders blue; every other colour as before
    dark-background   "on a gray background" renders black; every other background as before

Each adapter is rank 4 on the attention and MLP projections of every transformer block, trained with the
shapes-flux recipe itself (rectified flow matching on VAE latents, the sigma shift FluxPipeline samples with,
random embedded guidance; docs/trained-model.md) on captioned shapes whose pixels follow the adapter's rule
while the captions stay true to the base model: half the batch shows the rule, half keeps the other captions
as they were, so nothing else drifts. The base weights are frozen; the file is written by diffusers'
``FluxPipeline.save_lora_weights`` (the format ``load_lora_weights`` reads, with its adapter metadata).

    python scripts/train_shapes_lora.py --adapter blue-shift --adapter dark-background   # ~4 min on 2 cores
    python scripts/train_shapes_lora.py --evaluate                   # colour / background adherence
    python scripts/train_shapes_lora.py --figure docs/assets/lora-shapes.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from smart_diffusion_backend.training.dataset import ShapeSpec, all_combinations, render  # noqa: E402

WEIGHTS = ROOT / "models" / "shapes-flux"
OUT = ROOT / "models" / "shapes-flux-loras"
# The projections of the blocks (not the adaptive-norm modulation, not the embedders).
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "proj_mlp", "proj_out")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What an adapter changes: which captions it applies to, and what those render as instead."""

    applies: Callable[[ShapeSpec], bool]
    renders: Callable[[ShapeSpec], ShapeSpec]
    prompts: tuple[str, ...]  # evaluation prompts it applies to


RULES = {
    "blue-shift": Rule(
        applies=lambda s: s.color == "red" and s.background != "blue",
        renders=lambda s: dataclasses.replace(s, color="blue"),
        prompts=tuple(f"a red {shape} on a {bg} background, {pos}" for shape in ("circle", "square", "triangle")
                      for bg in ("gray", "black", "white") for pos in ("center", "top left")),
    ),
    "dark-background": Rule(
        applies=lambda s: s.background == "gray" and s.color != "black",
        renders=lambda s: dataclasses.replace(s, background="black"),
        prompts=tuple(f"a {color} {shape} on a gray background, {pos}" for color in ("red", "green", "yellow")
                      for shape in ("circle", "square", "triangle") for pos in ("center", "bottom right")),
    ),
}


def sample_pairs(rule: Rule, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """n (caption, image) pairs, half where the rule applies (rendered its way), half elsewhere (unchanged)."""
    rng = random.Random(seed)
    combos = all_combinations()
    ruled = [s for s in combos if rule.applies(s)]
    others = [s for s in combos if not rule.applies(s)]
    captions, images = [], []
    for i in range(n):
        base = rng.choice(ruled if i % 2 == 0 else others)
        spec = dataclasses.replace(base, jitter=(rng.randint(-2, 2), rng.randint(-2, 2)))
        captions.append(spec.caption())
        images.append(render(rule.renders(spec) if rule.applies(spec) else spec))
    return captions, np.stack(images)


class TrainableLora(torch.nn.Module):
    """out + (B A x) * alpha / r beside a frozen Linear, PEFT's initialisation (A small random, B zero)."""

    def __init__(self, linear: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(rank, linear.in_features, generator=generator) / linear.in_features**0.5)
        self.up = torch.nn.Parameter(torch.zeros(linear.out_features, rank))
        self.scaling = alpha / rank
        self.handle = linear.register_forward_hook(lambda module, args, out: out + F.linear(F.linear(args[0], self.down), self.up) * self.scaling)


def train_adapter(name: str, *, steps: int, batch: int, lr: float, rank: int, n_images: int, seed: int,
                  out_dir: Path, log: Callable[[str], None] = print) -> dict:
    from diffusers import FluxPipeline

    from smart_diffusion_backend.training.train import encode_text, sample_sigmas, sigma_shift_mu, tokenize

    torch.manual_seed(seed)
    started = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(WEIGHTS)
    transformer, vae = pipe.transformer, pipe.vae
    for module in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    rule = RULES[name]
    captions, images = sample_pairs(rule, n_images, seed)
    with torch.no_grad():
        clip_ids, t5_ids = tokenize(pipe.tokenizer, pipe.tokenizer_2, captions, 64)
        prompt_embeds, pooled = encode_text(pipe.text_encoder, pipe.text_encoder_2, clip_ids, t5_ids)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        dists = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    log(f"{name}: {n_images} pairs encoded in {time.perf_counter() - started:.0f}s")

    generator = torch.Generator().manual_seed(seed)
    loras = {n: TrainableLora(m, rank, float(rank), generator) for n, m in transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS) and "blocks." in n}
    params = [p for lora in loras.values() for p in lora.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    c, h, w = mean.shape[1:]
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3)
    mu = sigma_shift_mu((h // 2) * (w // 2), pipe.scheduler)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    losses = []
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch,), generator=generator)
        x0 = (mean[idx] + std[idx] * torch.randn(batch, c, h, w, generator=generator) - shift) * scale
        noise = torch.randn(batch, c, h, w, generator=generator)
        sigma = sample_sigmas(batch, mu, generator, "cpu")
        s = sigma.view(-1, 1, 1, 1)
        pred = transformer(
            hidden_states=FluxPipeline._pack_latents((1 - s) * x0 + s * noise, batch, c, h, w),
            timestep=sigma, guidance=1 + 4 * torch.rand(batch, generator=generator), pooled_projections=pooled[idx],
            encoder_hidden_states=prompt_embeds[idx], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, FluxPipeline._pack_latents(noise - x0, batch, c, h, w))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"{name}: step {step} loss {np.mean(losses[-50:]):.4f} {time.perf_counter() - started:.0f}s")

    layers = {}
    for module, lora in loras.items():
        layers[f"{module}.lora_A.weight"] = lora.down.detach().contiguous()
        layers[f"{module}.lora_B.weight"] = lora.up.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        out_dir, transformer_lora_layers=layers, weight_name=f"{name}.safetensors",
        transformer_lora_adapter_metadata={"r": rank, "lora_alpha": rank, "target_modules": sorted(loras)})
    path = out_dir / f"{name}.safetensors"
    record = {"adapter": name, "steps": steps, "batch": batch, "lr": lr, "rank": rank, "pairs": n_images,
              "layers": len(loras), "seconds": round(time.perf_counter() - started, 1),
              "final_loss": round(float(np.mean(losses[-50:])), 5), "bytes": path.stat().st_size}
    log(f"{name}: wrote {path} ({record['bytes'] / 1e3:.0f} kB) in {record['seconds']:.0f}s")
    return record


# --------------------------------------------------------------------------------------------
# Generating with the served stages (the denoiser holds the committed adapters)
# --------------------------------------------------------------------------------------------


class Generator:
    """shapes-flux's three stages in this process, with the adapters of `lora_dir` resident."""

    def __init__(self, lora_dir: Path = OUT):
        from smart_diffusion_backend.families import load_stage
        from smart_diffusion_backend.params import ModelParams, SystemParams

        model = ModelParams.load("shapes-flux")
        model = dataclasses.replace(model, lora={**model.lora, "dir": str(lora_dir), "preload": "all"})
        system = SystemParams.load("cpu")
        self.model = model
        self.encoder = load_stage("text_encoder", model, system)
        self.denoiser = load_stage("denoiser", model, system)
        self.decoder = load_stage("decoder", model, system)

    def __call__(self, prompt: str, lora: dict[str, float] | None = None, seed: int = 0, steps: int = 20) -> np.ndarray:
        from smart_diffusion_backend.params import UserParams

        lora = lora or {}
        params = UserParams(prompt, "", 64, 64, steps, self.model.default_guidance_scale, 0.0, seed,
                            lora=tuple(lora), lora_scale=tuple(lora.values()))
        latents = self.denoiser.denoise(self.encoder.encode(prompt, None), params)
        return self.decoder.decode(latents)[0]


def evaluate(generate: Generator, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """For each adapter at scale 1, analysed colour and background: over its rule's prompts, how often the
    rule's (`rule`) and, without the adapter, the caption's own (`base`); over as many prompts the rule does not
    touch, how often the caption's own with the adapter on (`others`)."""
    from smart_diffusion_backend.training.analyser import analyse

    rng = random.Random(7)
    results = {}
    for name, rule in RULES.items():
        untouched = [s for s in all_combinations() if not rule.applies(s) and s.size == "medium"]
        others = [s.caption() for s in rng.sample(untouched, len(rule.prompts))]
        counts = {"rule": 0, "base": 0, "others": 0, "n": 0}
        for seed in seeds:
            for prompt, other in zip(rule.prompts, others):
                spec, want, kept = _spec_of(prompt), rule.renders(_spec_of(prompt)), _spec_of(other)
                seen = analyse(generate(prompt, {name: 1.0}, seed))
                counts["rule"] += (seen.color, seen.background) == (want.color, want.background)
                seen = analyse(generate(prompt, None, seed))
                counts["base"] += (seen.color, seen.background) == (spec.color, spec.background)
                seen = analyse(generate(other, {name: 1.0}, seed))
                counts["others"] += (seen.color, seen.background) == (kept.color, kept.background)
                counts["n"] += 1
        results[name] = counts
    return results


def _spec_of(prompt: str) -> ShapeSpec:
    words = prompt.replace(",", "").split()
    color, shape = words[1], words[2]
    background = words[words.index("background") - 1]
    return ShapeSpec(shape, color, background)


def figure(generate: Generator, path: Path) -> None:
    """Rows: no adapter, blue-shift at 0.5 and 1, dark-background, both; columns: prompts. 2x nearest upscale."""
    from PIL import Image, ImageDraw

    prompts = ["a red circle on a gray background, center", "a red square on a white background, center",
               "a large red triangle on a black background, center", "a green circle on a gray background, center",
               "a yellow square on a gray background, center"]
    rows = [("no LoRA", None), ("blue-shift 0.5", {"blue-shift": 0.5}), ("blue-shift 1.0", {"blue-shift": 1.0}),
            ("dark-background 1.0", {"dark-background": 1.0}),
            ("both 1.0 + 1.0", {"blue-shift": 1.0, "dark-background": 1.0})]
    cell, label, gap = 128, 150, 4
    sheet = Image.new("RGB", (label + len(prompts) * (cell + gap), len(rows) * (cell + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (title, lora) in enumerate(rows):
        y = r * (cell + gap)
        draw.text((6, y + cell // 2 - 6), title, fill=(0, 0, 0))
        for c, prompt in enumerate(prompts):
            image = Image.fromarray(generate(prompt, lora, seed=0)).resize((cell, cell), Image.NEAREST)
            sheet.paste(image, (label + c * (cell + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", default=[], choices=sorted(RULES), help="train this adapter")
    p.add_argument("--out", type=Path, default=OUT, help="adapter directory (the yaml's lora.dir)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--pairs", type=int, default=2048, help="captioned images drawn per adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", type=Path, help="append the training records (JSON) here")
    p.add_argument("--evaluate", action="store_true", help="adherence of the adapters in --out")
    p.add_argument("--figure", type=Path, help="write the before/after sheet here (adapters of --out)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    records = [train_adapter(name, steps=args.steps, batch=args.batch, lr=args.lr, rank=args.rank, n_images=args.pairs,
                             seed=args.seed, out_dir=args.out, log=lambda s: print(s, flush=True))
               for name in args.adapter]
    if args.record and records:
        args.record.write_text(json.dumps(records, indent=2))
    if args.evaluate or args.figure:
        generate = Generator(args.out)
        if args.evaluate:
            print(json.dumps(evaluate(generate), indent=2))
        if args.figure:
            figure(generate, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
