#!/usr/bin/env python3
"""Prompt adherence of `shapes-flux` through the served pipeline (a real tritonserver), plus latency.

  python scripts/eval_adherence.py                       # grid + random captions + 10 timed requests
  python scripts/eval_adherence.py --in-process          # same grid through the stages, no server

Generates every colour x shape on two backgrounds (2 seeds each) and a set of random dataset captions,
scores each image with the deterministic analyser (smart_diffusion_backend/training/analyser.py),
writes a sample grid PNG and a markdown table, and times default 64x64 requests end to end.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from smart_diffusion_backend.params import ModelParams  # noqa: E402
from smart_diffusion_backend.training.dataset import BACKGROUND, FOREGROUND, SHAPES  # noqa: E402
from smart_diffusion_backend.training.evaluate import (  # noqa: E402
    EvalCase,
    Score,
    grid_cases,
    image_grid,
    random_cases,
    score,
)

LATENCY_PROMPT = "a red circle on a gray background, center"


@dataclass(frozen=True)
class EvalConfig:
    model: str = "shapes-flux"
    system: str = "cpu"
    backgrounds: tuple[str, ...] = ("gray", "black")
    seeds: tuple[int, ...] = (0, 1)
    random_captions: int = 100
    latency_requests: int = 10
    protocol: str = "http"


class ServedGenerator:
    """A tritonserver serving one model yaml, written into a temporary repository."""

    def __init__(self, cfg: EvalConfig, tmp: Path):
        from smart_diffusion_backend.repository import write_repository
        from smart_diffusion_backend.serving import TritonServer, free_port
        from smart_diffusion_client import SmartDiffusionClient

        repo = tmp / "repo"
        write_repository(repo, [cfg.model], cfg.system)
        self.server = TritonServer(
            repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
            backend_dir=ROOT / ".triton" / "backends", log_file=tmp / "tritonserver.log",
        )
        t0 = time.perf_counter()
        self.server.start(ready_timeout_s=300)
        self.startup_s = time.perf_counter() - t0
        url = self.server.http_url if cfg.protocol == "http" else self.server.grpc_url
        self.client = SmartDiffusionClient(url, cfg.protocol)

    def __call__(self, prompt: str, seed: int) -> tuple[np.ndarray, float, dict]:
        t0 = time.perf_counter()
        result = self.client.generate(prompt, seed=seed)  # every other param: the model's default
        return result.image, time.perf_counter() - t0, result.stats

    def close(self) -> None:
        self.client.close()
        code = self.server.stop()
        if code != 0:
            print(f"warning: tritonserver exited with {code}\n{self.server.log_tail()}", file=sys.stderr)


class InProcessGenerator:
    """The same three stages the server runs, called directly (no Triton)."""

    startup_s = 0.0

    def __init__(self, cfg: EvalConfig):
        from smart_diffusion_backend.families import load_stage
        from smart_diffusion_backend.params import SystemParams

        self.model = ModelParams.load(cfg.model)
        system = SystemParams.load(cfg.system)
        self.stages = {k: load_stage(k, self.model, system) for k in ("text_encoder", "denoiser", "decoder")}

    def __call__(self, prompt: str, seed: int) -> tuple[np.ndarray, float, dict]:
        from smart_diffusion_backend.params import UserParams

        m = self.model
        t0 = time.perf_counter()
        params = UserParams(prompt, "", m.default_height, m.default_width, m.default_steps, m.default_guidance_scale, 0.0, seed)
        image = self.stages["decoder"].decode(self.stages["denoiser"].denoise(self.stages["text_encoder"].encode(prompt, None), params))[0]
        return image, time.perf_counter() - t0, {}

    def close(self) -> None:
        pass


def run_cases(gen, cases: list[EvalCase]) -> list[np.ndarray]:
    return [gen(c.prompt, c.seed)[0] for c in cases]


def grid_png(cases: list[EvalCase], images: list[np.ndarray], path: Path, seed: int) -> None:
    """Rows: foreground colours; columns: shape x background. Cells where colour == background stay blank."""
    by_key = {(c.spec.color, c.spec.shape, c.spec.background): im for c, im in zip(cases, images) if c.seed == seed}
    bgs = sorted({c.spec.background for c in cases}, key=list(BACKGROUND).index)
    blank = np.full_like(images[0], 255)
    tiles = [by_key.get((color, shape, bg), blank) for color in FOREGROUND for bg in bgs for shape in SHAPES]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(tiles, cols=len(bgs) * len(SHAPES), scale=2)).save(path)


def cell_table(grid: Score, backgrounds: tuple[str, ...], seeds: int) -> list[str]:
    """Markdown: colour x shape, 'colour ok / shape ok' counts over backgrounds x seeds."""
    lines = ["| colour \\ shape | " + " | ".join(SHAPES) + " |", "|---|" + "---|" * len(SHAPES)]
    for color in FOREGROUND:
        cells = []
        for shape in SHAPES:
            rows = [r for r in grid.rows if r["prompt"].startswith(f"a {color} {shape} ")]
            cells.append(f"{sum(r['ok_color'] for r in rows)}/{len(rows)} · {sum(r['ok_shape'] for r in rows)}/{len(rows)}")
        lines.append(f"| {color} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-flux")
    p.add_argument("--system", default="cpu")
    p.add_argument("--protocol", default="http", choices=("http", "grpc"))
    p.add_argument("--random", type=int, default=100, help="random dataset captions scored besides the grid")
    p.add_argument("--latency-requests", type=int, default=10)
    p.add_argument("--in-process", action="store_true", help="call the stages directly instead of a server")
    p.add_argument("--out-md", default=str(ROOT / "bench" / "results" / "training" / "adherence-cpu.md"))
    p.add_argument("--grid-png", default=str(ROOT / "docs" / "assets" / "shapes-grid.png"))
    a = p.parse_args(argv)
    cfg = EvalConfig(model=a.model, system=a.system, random_captions=a.random, latency_requests=a.latency_requests,
                     protocol=a.protocol)
    model = ModelParams.load(cfg.model)

    grid, rand = grid_cases(cfg.backgrounds, cfg.seeds), random_cases(cfg.random_captions)
    with tempfile.TemporaryDirectory(prefix="eval-adherence-") as tmp:
        gen = InProcessGenerator(cfg) if a.in_process else ServedGenerator(cfg, Path(tmp))
        try:
            gen(LATENCY_PROMPT, 0)  # warm-up: first-request allocations are not the model's latency
            t0 = time.perf_counter()
            grid_images = run_cases(gen, grid)
            rand_images = run_cases(gen, rand)
            gen_s = time.perf_counter() - t0
            latencies, stages = [], []
            for i in range(cfg.latency_requests):
                _, dt, stats = gen(LATENCY_PROMPT, 100 + i)
                latencies.append(dt)
                stages.append(stats.get("stages_ms", {}))
        finally:
            gen.close()

    g, r = score(grid, grid_images), score(rand, rand_images)
    grid_png(grid, grid_images, Path(a.grid_png), seed=cfg.seeds[0])
    median = statistics.median(latencies)
    stage_median = {k: statistics.median(s[k] for s in stages) for k in (stages[0] if stages and stages[0] else {})}
    how = "in process (stages, no server)" if a.in_process else f"tritonserver, {cfg.protocol}, `{cfg.system}` system"
    lines = [
        f"# Prompt adherence of `{cfg.model}` ({time.strftime('%Y-%m-%d')})",
        "",
        f"Generated through {how}; defaults of `configs/models/{cfg.model}.yaml`: {model.default_steps} steps, "
        f"guidance {model.default_guidance_scale:g}, {model.default_height}x{model.default_width}. Host: {platform.machine()}, "
        f"{os.cpu_count()} CPUs. Command: `python scripts/eval_adherence.py{' --in-process' if a.in_process else ''}`.",
        "Scored by the deterministic analyser `smart_diffusion_backend/training/analyser.py` "
        "(100 % on the generator's own images, see `tests/test_training.py`).",
        "",
        "| prompt set | images | colour | shape | colour and shape | background | position |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in ((f"grid: {len(FOREGROUND)} colours × {len(SHAPES)} shapes × {{{', '.join(cfg.backgrounds)}}} × {len(cfg.seeds)} seeds", g),
                    ("random dataset captions (sizes, positions, all backgrounds)", r)):
        lines.append(f"| {name} | {s.n} | {s.rate('color'):.1%} | {s.rate('shape'):.1%} | {s.rate('both'):.1%} | "
                     f"{s.rate('background'):.1%} | {s.rate('position'):.1%} |")
    lines += ["", "Grid cells (colour correct · shape correct, over backgrounds × seeds):", "", *cell_table(g, cfg.backgrounds, len(cfg.seeds))]
    misses = [row for row in g.rows + r.rows if not (row["ok_color"] and row["ok_shape"])]
    lines += ["", f"Misses ({len(misses)}):", ""] + [
        f"- `{m['prompt']}` seed {m['seed']}: got {m['color']} {m['shape']} (fill {m['fill']}, balance {m['balance']})" for m in misses
    ]
    lines += [
        "",
        f"## Latency: {cfg.latency_requests} default requests (`{LATENCY_PROMPT}`), end to end at the client",
        "",
        f"median **{median * 1000:.0f} ms**, min {min(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
        + (f"; server start {gen.startup_s:.1f} s" if not a.in_process else ""),
        "",
    ]
    if stage_median:
        lines.append("Median per-stage ms (server STATS): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_median.items()))
        lines.append("")
    lines.append(f"All {len(grid) + len(rand)} evaluation images took {gen_s:.0f} s.")
    lines.append(f"Sample grid: `{os.path.relpath(a.grid_png, ROOT)}` (rows: colours; columns: shapes on "
                 f"{' then '.join(cfg.backgrounds)}; seed {cfg.seeds[0]}).")
    out = Path(a.out_md)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
