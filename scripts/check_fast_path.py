"""Check the fast path on your own weights before you serve it: exact vs fast images, PSNR and SSIM.

`fast_path: true` (the GPU system yamls) runs our attention, regional compile and, where the card has FP8
tensor cores, fp8_linear. This renders a fixed prompt set twice on this machine — through the exact path
(diffusers' math: SDPA, eager, bf16 GEMMs) and through the system's fast path — with the same seeds,
text encoder and VAE, and reports per prompt how far the fast images lie from the exact ones.

    python scripts/check_fast_path.py --model flux1-dev --system gpu-1 --out outputs/fast-path-check.md
    python scripts/check_fast_path.py --model flux1-dev --system gpu-1 --no-fp8   # compile + attention only

Exit status 1 when any image falls below --min-psnr or --min-ssim: then keep `fp8_linear: false` in
the system yaml (or `fast_path: false`), or look at the images it writes beside the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smart_diffusion_backend.families import load_stage  # noqa: E402
from smart_diffusion_backend.params import ModelParams, SystemParams  # noqa: E402
from smart_diffusion_backend.quality import compare, exact_system, render, summary  # noqa: E402

PROMPTS = [  # varied content: faces, text, fine texture, flat colour, night, crowds
    "a portrait photo of an elderly fisherman, weathered skin, soft window light",
    "a street sign that reads 'SMART DIFFUSION' in bold white letters",
    "macro photo of a bee on a lavender flower, shallow depth of field",
    "a minimalist poster: one red circle on a flat beige background",
    "a city skyline at night with neon reflections on wet asphalt",
    "a crowded market in Marrakech, spices in baskets, warm afternoon",
    "an astronaut riding a horse on the moon, photorealistic",
    "a watercolor painting of a fox in a snowy forest",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model yaml (its weights must be on this host)")
    parser.add_argument("--system", default="gpu-1", help="system yaml whose fast path to check")
    parser.add_argument("--no-fp8", action="store_true", help="check the fast path with fp8_linear off")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per prompt (0, 1, ...)")
    parser.add_argument("--prompts", type=Path, help="one prompt per line instead of the built-in set")
    parser.add_argument("--min-psnr", type=float, default=30.0)
    parser.add_argument("--min-ssim", type=float, default=0.90)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "fast-path-check.md")
    args = parser.parse_args()

    model, system = ModelParams.load(args.model), SystemParams.load(args.system)
    fast = dataclasses.replace(system, fp8_linear=False) if args.no_fp8 else system
    if not (fast.attention_backend != "sdpa" or fast.compile_transformer or fast.fp8_linear):
        parser.error(f"system {args.system!r} has no fast path to check (fast_path: true sets one)")
    lines = args.prompts.read_text().splitlines() if args.prompts else PROMPTS
    prompts = [(p, seed) for p in lines if p.strip() for seed in range(args.seeds)]
    height, width = args.height or model.default_height, args.width or model.default_width
    steps = args.steps or model.default_steps

    shared = {"text_encoder": load_stage("text_encoder", model, system), "decoder": load_stage("decoder", model, system)}
    started = time.perf_counter()
    exact_images = render(model, exact_system(system), prompts, height, width, steps, shared)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    fast_images = render(model, fast, prompts, height, width, steps, shared)  # compile and warm-up included
    fast_s = time.perf_counter() - started
    rows = compare(exact_images, fast_images, prompts)
    totals = summary(rows)
    passed = totals["min_psnr_db"] >= args.min_psnr and totals["min_ssim"] >= args.min_ssim

    args.out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, (a, b) in enumerate(zip(exact_images, fast_images)):
        Image.fromarray(a).save(args.out.with_name(f"{args.out.stem}-{i:02d}-exact.png"))
        Image.fromarray(b).save(args.out.with_name(f"{args.out.stem}-{i:02d}-fast.png"))
    table = "\n".join(f"| {r.prompt} | {r.seed} | {r.psnr_db:.2f} | {r.ssim:.4f} |" for r in rows)
    args.out.write_text(f"""# Fast path vs exact path: {model.name} on {args.system}

Fast path: attention `{fast.attention_backend}`, compile `{fast.compile_transformer}`, fp8_linear
`{fast.fp8_linear}` (auto: on where the card has FP8 tensor cores). {height}x{width}, {steps} steps.
Exact path rendered in {exact_s:.1f} s, fast path in {fast_s:.1f} s (its compile included).

**{"PASS" if passed else "FAIL"}** (min PSNR {totals["min_psnr_db"]:.2f} dB >= {args.min_psnr}, min SSIM
{totals["min_ssim"]:.4f} >= {args.min_ssim}); mean PSNR {totals["mean_psnr_db"]:.2f} dB, mean SSIM {totals["mean_ssim"]:.4f}.

| prompt | seed | PSNR dB | SSIM |
|---|---|---|---|
{table}
""")
    print(args.out.read_text())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
