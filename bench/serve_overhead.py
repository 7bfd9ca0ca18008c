"""Per-stage times and Triton overhead: the same request served vs called in-process.

    .venv/bin/python bench/serve_overhead.py --height 256 --width 256 --steps 4 --repeats 10 \
        [--model tiny-flux --system cpu] [--out bench/results/serve-overhead-cpu.md]

In-process: the three stage services called back to back in this process (what the server runs,
minus Triton). Served: `smart_diffusion` over HTTP and gRPC on a real tritonserver. Both warm; medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from client import Request, SmartDiffusionClient  # noqa: E402
from smart_diffusion_backend.params import project_root  # noqa: E402
from smart_diffusion_backend.repository import write_repository  # noqa: E402
from smart_diffusion_backend.serving import TritonServer, free_port  # noqa: E402
from smart_diffusion_backend.service import DecoderService, DenoiserService, TextEncoderService, load_params  # noqa: E402


def in_process(model_name: str, system_name: str, request: Request, repeats: int) -> tuple[list[float], dict, np.ndarray]:
    model, system = load_params(model_name, system_name)
    encoder, denoiser, decoder = TextEncoderService(model, system), DenoiserService(model, system), DecoderService(model, system)
    tensors = {name: array for name, (array, _) in request.tensors().items()}
    text = {k: v for k, v in tensors.items() if k in ("PROMPT", "NEGATIVE_PROMPT")}
    rest = {k: v for k, v in tensors.items() if k not in text}
    totals, stage_times = [], {"text_encoder": [], "denoiser": [], "vae_decoder": []}
    image = None
    for i in range(repeats + 1):  # first run warms up
        started = time.perf_counter()
        t0 = time.perf_counter()
        encoded = encoder(text)
        t1 = time.perf_counter()
        denoised = denoiser({**encoded, **rest})
        t2 = time.perf_counter()
        image = decoder(denoised)["IMAGE"]
        t3 = time.perf_counter()
        if i:
            totals.append((time.perf_counter() - started) * 1000)
            for key, dt in zip(stage_times, (t1 - t0, t2 - t1, t3 - t2)):
                stage_times[key].append(dt * 1000)
    return totals, {k: statistics.median(v) for k, v in stage_times.items()}, image


def served(server: TritonServer, protocol: str, request: Request, repeats: int) -> tuple[list[float], dict, np.ndarray]:
    url = server.http_url if protocol == "http" else server.grpc_url
    totals, stages = [], []
    with SmartDiffusionClient(url, protocol) as client:
        client.infer(request)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            result = client.infer(request)
            totals.append((time.perf_counter() - started) * 1000)
            stages.append(result.stats["stages_ms"])
    return totals, {k: statistics.median(s[k] for s in stages) for k in stages[0]}, result.image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--system", default="cpu")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    request = Request(prompt="a red circle on a blue background", height=args.height, width=args.width, steps=args.steps, seed=7)

    local_totals, local_stages, local_image = in_process(args.model, args.system, request, args.repeats)
    repo = project_root() / "build" / "bench_repository"
    write_repository(repo, [args.model], args.system)
    log = project_root() / "build" / "bench_server.log"
    server = TritonServer(repo, free_port(), free_port(), free_port(), backend_dir=project_root() / ".triton" / "backends", log_file=log)
    with server:
        rows = {"in-process": (local_totals, local_stages)}
        for protocol in ("http", "grpc"):
            totals, stages, image = served(server, protocol, request, args.repeats)
            if not np.array_equal(image, local_image):
                sys.exit(f"served image differs from in-process image over {protocol}")
            rows[f"served {protocol}"] = (totals, stages)

    base = statistics.median(local_totals)
    lines = [
        f"# Serving overhead: {args.model}, {args.height}x{args.width}, {args.steps} steps, system {args.system}",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"median of {args.repeats} warm requests; served images equal the in-process image.",
        f"Command: `.venv/bin/python bench/serve_overhead.py --model {args.model} --system {args.system} "
        f"--height {args.height} --width {args.width} --steps {args.steps} --repeats {args.repeats}`",
        "",
        "| path | total ms (median) | min | max | text_encoder ms | denoiser ms | vae_decoder ms | overhead vs in-process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (totals, stages) in rows.items():
        median = statistics.median(totals)
        overhead = "—" if name == "in-process" else f"{median - base:+.1f} ms ({(median / base - 1) * 100:+.1f} %)"
        lines.append(
            f"| {name} | {median:.1f} | {min(totals):.1f} | {max(totals):.1f} | {stages['text_encoder']:.1f} | "
            f"{stages['denoiser']:.1f} | {stages['vae_decoder']:.1f} | {overhead} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
