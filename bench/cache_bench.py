#!/usr/bin/env python3
"""Feature-cache quality / speed sweep over CACHE_RATIO on one model (CPU or GPU, real stages).

  .venv/bin/python -m bench.cache_bench tiny-flux                      # -> bench/results/cache/cache-tiny-flux.md
  .venv/bin/python -m bench.cache_bench shapes-flux --prompts 32 --steps 28
  .venv/bin/python -m bench.cache_bench tiny-flux --cache-yaml my_cache.yaml   # try another cache: section

For every prompt (fixed seeds) and ratio in --ratios: text encode once, denoise with the cache the model
yaml's ``cache:`` section gives for that ratio, decode, and compare with ratio 0 (the uncached request):
block evaluations (the cache's own count), denoise wall time, PSNR and SSIM of the decoded uint8 images,
and — for shapes prompts — the prompt-adherence rate of smart_diffusion_backend.training.analyser.

Forecast ablation (--ablation, on by default): at each ratio the skip schedule of the plain-reuse run is
replayed with forecast taylor1 / taylor2, so quality is compared at exactly equal skips.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from smart_diffusion_backend.cache import CacheConfig  # noqa: E402
from smart_diffusion_backend.families import family, load_stage  # noqa: E402
from smart_diffusion_backend.params import ModelParams, SystemParams, UserParams  # noqa: E402
from smart_diffusion_backend.repository import pipeline_name  # noqa: E402

# Used only when the model yaml has no `cache:` section yet (docs/cache.md proposes these for the yamls).
PROPOSED: dict[str, dict[str, Any]] = {
    "flux": {
        "policy": "teacache",
        "threshold": [0.08, 0.6],
        "warmup_steps": [3, 1],
        "cooldown_steps": [2, 1],
        "max_consecutive_skips": [1, 4],
    },
    "wan": {
        "policy": "teacache",
        "threshold": [0.08, 0.6],
        "warmup_steps": [3, 1],
        "cooldown_steps": [2, 1],
        "max_consecutive_skips": [1, 4],
    },
}

FALLBACK_PROMPTS = [
    f"a {size}{color} {shape} on a {bg} background, {pos}"
    for size, color, shape, bg, pos in [
        ("", "red", "circle", "white", "center"), ("small ", "blue", "square", "black", "top left"),
        ("large ", "green", "triangle", "white", "bottom"), ("", "yellow", "circle", "black", "right"),
    ]
]


# ---- image metrics ------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' Gaussian filter over the last two axes of [..., H, W]."""
    k = len(window)
    h, w = img.shape[-2:]
    out = sum(window[i] * img[..., i : h - k + 1 + i, :] for i in range(k))
    return sum(window[i] * out[..., :, i : w - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03), per channel, uint8 [..., H, W, C]."""
    x = np.moveaxis(a.astype(np.float64), -1, -3)  # [..., C, H, W]
    y = np.moveaxis(b.astype(np.float64), -1, -3)
    size = min(11, *x.shape[-2:])
    window = _gaussian_window(size - (size % 2 == 0))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter(x, window), _filter(y, window)
    sxx = _filter(x * x, window) - mx * mx
    syy = _filter(y * y, window) - my * my
    sxy = _filter(x * y, window) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


# ---- stages -------------------------------------------------------------------------------------


class FamilyRunner:
    """Encode / denoise-with-cache / decode for one model, whatever its family."""

    def __init__(self, model: ModelParams, system: SystemParams):
        self.model = model
        self.encoder, self.denoiser, self.decoder = (
            load_stage(kind, model, system) for kind in ("text_encoder", "denoiser", "decoder"))
        self.transformer = self.denoiser.transformer
        self.n_blocks = len(family(model.family).blocks(self.transformer))

    def encode(self, prompt: str):
        negative = "" if not self.model.negative_prompt else "blurry, low quality"
        return self.encoder.encode(prompt, negative or None)

    def denoise(self, embeddings, params: UserParams, config: CacheConfig | None) -> tuple[torch.Tensor, dict]:
        """The family's own denoise loop with an explicit cache config (a CacheConfig or None)."""
        stats: dict = {}
        latents = self.denoiser.denoise(embeddings, params, stats=stats, cache_config=config)
        return latents, stats

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return self.decoder.decode(latents)


def _prompts(n: int) -> tuple[list[str], bool]:
    try:
        from smart_diffusion_backend.training.dataset import sample_specs

        return [s.caption() for s in sample_specs(n, seed=1234)], True
    except ImportError:
        return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(n)], False


def _adherent(image: np.ndarray, prompt: str) -> bool | None:
    try:
        from smart_diffusion_backend.training.analyser import analyse, parse_prompt
    except ImportError:
        return None
    color, shape, _bg = parse_prompt(prompt)
    frames = image if image.ndim == 4 else image[None]
    a = analyse(frames[len(frames) // 2])
    return a.color == color and a.shape == shape


# ---- the sweep ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    model = ModelParams.load(args.model)
    system = SystemParams.load(args.system)
    if args.cache_yaml:
        section = (yaml.safe_load(Path(args.cache_yaml).read_text()) or {}).get("cache", {})
        source = f"`{args.cache_yaml}`"
    elif model.cache:
        section, source = dict(model.cache), f"the model yaml (configs/models/{model.name}.yaml)"
    else:
        section, source = PROPOSED[model.family], "PROPOSED in bench/cache_bench.py (the model yaml has no `cache:` yet)"
    runner = FamilyRunner(model, system)
    prompts, shapes = _prompts(args.prompts)
    steps = args.steps or model.default_steps
    height = args.height or model.default_height
    width = args.width or model.default_width
    ratios = sorted({0.0, *args.ratios})
    rows: dict[Any, dict[str, list]] = {}

    def add(key, **values):
        bucket = rows.setdefault(key, {})
        for k, v in values.items():
            bucket.setdefault(k, []).append(v)

    t_start = time.perf_counter()
    for p_index, prompt in enumerate(prompts):
        embeddings = runner.encode(prompt)
        params = UserParams(
            prompt=prompt, negative_prompt="", height=height, width=width, steps=steps,
            guidance_scale=model.default_guidance_scale, cache_ratio=0.0, seed=1000 + p_index,
            num_frames=model.default_num_frames,
        )
        reference = None
        for ratio in ratios:
            config = CacheConfig.from_model_cache(section, ratio)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                latents, stats = runner.denoise(embeddings, params, config)
                times.append(time.perf_counter() - t0)
            image = runner.decode(latents)
            if reference is None:
                reference = image
            add(ratio, time=min(times), blocks=stats["cache_block_evals"], total=stats["cache_block_evals_total"],
                skipped=stats["cache_steps_skipped"], psnr=psnr(reference, image), ssim=ssim(reference, image),
                adherent=_adherent(image, prompt) if shapes else None,
                config=config)
            if args.ablation and config is not None:
                for forecast in ("taylor1", "taylor2"):
                    schedule = stats["cache_schedule"].get("cond") or next(iter(stats["cache_schedule"].values()))
                    replay = config.with_(forecast=forecast, schedule=schedule)
                    latents_f, stats_f = runner.denoise(embeddings, params, replay)
                    image_f = runner.decode(latents_f)
                    add((ratio, forecast), blocks=stats_f["cache_block_evals"], psnr=psnr(reference, image_f),
                        ssim=ssim(reference, image_f))
        print(f"[{p_index + 1}/{len(prompts)}] {time.perf_counter() - t_start:.1f}s", file=sys.stderr, flush=True)
    return report(args, model, system, section, source, ratios, rows, runner.n_blocks, steps, height, width, len(prompts))


def _mean(xs) -> float:
    finite = [x for x in xs if x != float("inf")]
    if not finite:
        return float("inf")
    return statistics.fmean(finite)


def _fmt_db(x: float) -> str:
    return "∞" if x == float("inf") else f"{x:.2f}"


def report(args, model, system, section, source, ratios, rows, n_blocks, steps, height, width, n_prompts) -> str:
    base_time = _mean(rows[0.0]["time"])
    # ratio 0 runs without hooks, so it cannot count forwards of loops that never call step()/branch()
    # (WanDenoiser): its block count is the cached runs' "total", the same loop without skipping.
    base_blocks = max(_mean(rows[r]["total"]) for r in ratios)
    rows[0.0]["blocks"] = rows[0.0]["total"] = [base_blocks]
    lines = [
        f"# Feature cache on `{model.name}` ({model.family})",
        "",
        f"Generated by `python -m bench.cache_bench {args.model}` on {time.strftime('%Y-%m-%d')}: {n_prompts} prompts, "
        f"seeds 1000..{1000 + n_prompts - 1}, {steps} steps, {height}x{width}"
        + (f"x{model.default_num_frames}f" if model.default_num_frames else "")
        + f", system `{system.name}` ({system.device}, {system.dtype}, {args.threads} thread(s)), "
        f"{n_blocks} transformer blocks per forward.",
        f"Cache section from {source}:",
        "",
        "```yaml",
        yaml.safe_dump({"cache": section}, default_flow_style=None, sort_keys=False).rstrip(),
        "```",
        "",
        "PSNR / SSIM: decoded uint8 output vs the same request at ratio 0 (mean over prompts; min in brackets; "
        "identical images are left out of the PSNR mean). Wall: denoise loop only, min of "
        f"{args.repeats} run(s) per request, summed over prompts.",
        "",
        "| ratio | policy | threshold | warm-up / cool-down / max skips | block evals / image | fewer evals | "
        "steps skipped / image | wall speedup | PSNR dB (min) | SSIM (min) | adherence |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in ratios:
        r = rows[ratio]
        cfg = r["config"][0]
        blocks = _mean(r["blocks"])
        adherence = [a for a in r["adherent"] if a is not None]
        lines.append(
            "| {:.2f} | {} | {} | {} | {:.1f} / {:.0f} | {:.2f}x | {:.2f} | {:.2f}x | {} ({}) | {:.4f} ({:.4f}) | {} |".format(
                ratio,
                "none" if cfg is None else cfg.policy,
                "-" if cfg is None else f"{cfg.threshold:.3f}",
                "-" if cfg is None else f"{cfg.warmup_steps} / {cfg.cooldown_steps} / {cfg.max_consecutive_skips}",
                blocks, _mean(r["total"]), base_blocks / blocks, _mean(r["skipped"]),
                base_time / _mean(r["time"]),
                _fmt_db(_mean(r["psnr"])), _fmt_db(min(r["psnr"])),
                _mean(r["ssim"]), min(r["ssim"]),
                f"{sum(adherence)}/{len(adherence)}" if adherence else "-",
            )
        )
    if args.ablation:
        lines += [
            "",
            "## Forecast ablation at equal skips",
            "",
            "Each ratio's plain-reuse skip schedule replayed with a Taylor forecast of the skipped residual "
            "(TaylorSeer-style, in the step index). Kept only where it wins.",
            "",
            "| ratio | fewer evals | PSNR reuse | PSNR taylor1 | PSNR taylor2 | SSIM reuse | SSIM taylor1 | SSIM taylor2 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for ratio in ratios:
            if ratio == 0.0:
                continue
            r, t1, t2 = rows[ratio], rows[(ratio, "taylor1")], rows[(ratio, "taylor2")]
            lines.append(
                f"| {ratio:.2f} | {base_blocks / _mean(r['blocks']):.2f}x | {_fmt_db(_mean(r['psnr']))} | "
                f"{_fmt_db(_mean(t1['psnr']))} | {_fmt_db(_mean(t2['psnr']))} | {_mean(r['ssim']):.4f} | "
                f"{_mean(t1['ssim']):.4f} | {_mean(t2['ssim']):.4f} |"
            )
    target = [
        ratio for ratio in ratios
        if ratio > 0 and base_blocks / _mean(rows[ratio]["blocks"]) >= 2.5 and min(rows[ratio]["psnr"]) >= 30.0
    ]
    lines += [
        "",
        "Target (>= 2.5x fewer block evaluations at PSNR >= 30 dB for every prompt): "
        + (f"met at ratio {', '.join(f'{r:.2f}' for r in target)}." if target else "not met on this model."),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model yaml name (configs/models/<name>.yaml) or path")
    ap.add_argument("--system", default="cpu")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=28, help="denoising steps (0: the model's default)")
    ap.add_argument("--height", type=int, default=0)
    ap.add_argument("--width", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per request (min is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-yaml", default=None, help="a yaml with a `cache:` section to use instead of the model's")
    ap.add_argument("--no-ablation", dest="ablation", action="store_false")
    ap.add_argument("--out", default=None, help="default bench/results/cache/cache-<model>.md")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    text = run(args)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "cache" / f"cache-{pipeline_name(args.model)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
