"""Per-stage times and Triton overhead: the same request served vs called in-process.

    .venv/bin/python -m bench.serve_overhead --height 256 --width 256 --steps 4 --repeats 10 \
        [--model tiny-flux --system cpu] [--out bench/results/serving/serve-overhead-cpu.md]
    # GPU, real-architecture FLUX.1-dev (python -m bench.random_weights), two copies would not fit one card:
    python -m bench.serve_overhead --model flux1-dev --system gpu-1 --height 1024 --width 1024 \
        --steps 28 --repeats 5 --sequential --cycles 2 --warmup-s 60 --ready-timeout 900

In-process: the three stage services called back to back in this process (what the server runs,
minus Triton). Served: `smart_diffusion` over HTTP and gRPC on a real tritonserver. Both warm; medians.
Paths run interleaved round-robin (background load hits all alike), or with --sequential in phases:
in-process, server, in-process, ... (--cycles server phases, each bracketed by in-process ones; the
in-process stages are released before the server loads its own copy). A power-capped GPU's clocks fall
as it heats up, so --warmup-s first runs unmeasured requests until it is at its working temperature,
and the phase medians are listed in order, which shows any drift left.
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

from bench.report import emit  # noqa: E402
from smart_diffusion_backend.params import project_root  # noqa: E402
from smart_diffusion_backend.repository import write_repository  # noqa: E402
from smart_diffusion_backend.service import (  # noqa: E402
    DecoderService,
    DenoiserService,
    TextEncoderService,
    load_params,
)
from smart_diffusion_backend.serving import TritonServer, free_port  # noqa: E402
from smart_diffusion_client import Request, SmartDiffusionClient  # noqa: E402


class InProcess:
    """The three stage services in this process: the served pipeline minus Triton."""

    def __init__(self, model_name: str, system_name: str):
        model, system = load_params(model_name, system_name)
        self.stages = {
            "text_encoder": TextEncoderService(model, system),
            "denoiser": DenoiserService(model, system),
            "vae_decoder": DecoderService(model, system),
        }

    def __call__(self, request: Request) -> tuple[float, dict, np.ndarray]:
        tensors = {name: array for name, (array, _) in request.tensors().items()}
        text = {k: v for k, v in tensors.items() if k in ("PROMPT", "NEGATIVE_PROMPT")}
        rest = {k: v for k, v in tensors.items() if k not in text}
        times = {}
        started = time.perf_counter()
        t0 = time.perf_counter()
        encoded = self.stages["text_encoder"](text)
        times["text_encoder"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        denoised = self.stages["denoiser"]({**encoded, **rest})
        times["denoiser"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        image = self.stages["vae_decoder"](denoised)["IMAGE"]
        times["vae_decoder"] = (time.perf_counter() - t0) * 1000
        return (time.perf_counter() - started) * 1000, times, image

    def close(self) -> None:
        """Stop the pools and give the device memory back (the server loads its own copy next)."""
        import gc

        import torch

        for stage in self.stages.values():
            if hasattr(stage, "close"):
                stage.close()
        self.stages.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def served_once(client: SmartDiffusionClient, request: Request) -> tuple[float, dict, np.ndarray]:
    """Client-side total; STATS's stage times, the orchestrator's own share (BLS hops) and the rest
    (client, protocol, Triton's frontend)."""
    started = time.perf_counter()
    result = client.infer(request)
    total = (time.perf_counter() - started) * 1000
    parts = dict(result.stats["stages_ms"])
    parts["bls"] = result.stats.get("orchestration_ms", float("nan"))
    for stage, hop_ms in result.stats.get("hops_ms", {}).items():  # one BLS call minus the stage's own time
        parts[f"hop {stage}"] = hop_ms - parts[stage]
    parts["client"] = total - result.stats.get("total_ms", float("nan"))
    return total, parts, result.image


def run_rounds(paths: dict, request: Request, repeats: int, samples: dict, state: dict) -> None:
    """Round 0 warms every path up; the served images must equal the first (in-process) image.
    A path that fails is reported and dropped; the others go on."""
    for round_index in range(repeats + 1):
        for name, run in list(paths.items()):
            try:
                total, stages, image = run(request)
            except Exception as exc:  # noqa: BLE001 - reported in the results file
                state.setdefault("failed", []).append(f"{name}: {exc}")
                del paths[name]
                samples.pop(name, None)
                continue
            if state.get("reference") is None:
                state["reference"] = image
            elif not np.array_equal(image, state["reference"]):
                diff = np.abs(image.astype(np.int16) - state["reference"].astype(np.int16)).max()
                state.setdefault("mismatch", []).append(f"{name} (max |diff| {diff})")
            if round_index:
                samples[name].append((total, stages))


def machine_line() -> str:
    import torch

    line = f"Machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f", {torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--system", default="cpu")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sequential", action="store_true", help="in-process and server phases alternate, never together")
    parser.add_argument("--cycles", type=int, default=1, help="--sequential: server phases, each bracketed by in-process ones")
    parser.add_argument("--warmup-s", type=float, default=0.0,
                        help="--sequential: unmeasured in-process requests for this long first (GPU at its working temperature)")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds for the server to load the model")
    args = parser.parse_args()
    request = Request(prompt="a red circle on a blue background", height=args.height, width=args.width, steps=args.steps, seed=7)

    local = InProcess(args.model, args.system)
    repo = project_root() / "build" / "bench_repository"
    write_repository(repo, [args.model], args.system)
    log = project_root() / "build" / "bench_server.log"
    server = TritonServer(repo, free_port(), free_port(), free_port(), backend_dir=project_root() / ".triton" / "backends", log_file=log)
    samples: dict[str, list[tuple[float, dict]]] = {"in-process": [], "served grpc": [], "served http": []}
    state: dict = {}
    phases: list[str] = []  # "name: median ms" per phase, in order (drift shows here)
    load_times, exit_codes = [], []

    def serve_phase(with_local: bool) -> None:
        started = time.perf_counter()
        server.start(ready_timeout_s=args.ready_timeout)
        load_times.append(time.perf_counter() - started)
        try:
            with SmartDiffusionClient(server.http_url, "http") as http, SmartDiffusionClient(server.grpc_url, "grpc") as grpc:
                paths = {"served grpc": lambda r: served_once(grpc, r), "served http": lambda r: served_once(http, r)}
                if with_local:
                    paths = {"in-process": local, **paths}
                before = {name: len(samples[name]) for name in paths}
                run_rounds(paths, request, args.repeats, samples, state)
                phases.extend(f"{name} {statistics.median(t for t, _ in samples[name][before[name]:]):.0f}"
                              for name in paths if samples.get(name)[before[name]:])
        finally:
            exit_codes.append(server.stop())

    def local_phase() -> None:
        before = len(samples["in-process"])
        run_rounds({"in-process": local}, request, args.repeats, samples, state)
        phases.append(f"in-process {statistics.median(t for t, _ in samples['in-process'][before:]):.0f}")

    if args.sequential:
        warm_until = time.perf_counter() + args.warmup_s
        while time.perf_counter() < warm_until:
            local(request)
        for _ in range(args.cycles):
            local_phase()
            local.close()
            serve_phase(with_local=False)
            local = InProcess(args.model, args.system)
        local_phase()
        local.close()
    else:
        serve_phase(with_local=True)
    load_s, exit_code = load_times[0], ", ".join(map(str, exit_codes))
    rows = {
        name: ([t for t, _ in runs], {k: statistics.median(s[k] for _, s in runs) for k in runs[0][1]})
        for name, runs in samples.items()
    }
    local_totals = rows["in-process"][0]

    base = statistics.median(local_totals)
    lines = [
        f"# Serving overhead: {args.model}, {args.height}x{args.width}, {args.steps} steps, system {args.system}",
        "",
        f"{machine_line()}; median of {args.repeats} warm requests per path, "
        + (f"{args.cycles} server phase(s), each between in-process phases (--sequential; {args.warmup_s:g} s of "
           f"unmeasured in-process warm-up first); phase medians in order: {', '.join(phases)}" if args.sequential
           else "interleaved round-robin (in-process, HTTP, gRPC) so background load hits every path alike")
        + "; " + ("served images equal the in-process image." if not state.get("mismatch")
                  else f"IMAGES DIFFER from the in-process image: {', '.join(state['mismatch'])}."),
        f"Server: ready {load_s:.1f} s after start (model load included), exit code {exit_code}."
        + "".join(f" FAILED {failure}." for failure in state.get("failed", [])),
        f"Command: `python -m bench.serve_overhead {' '.join(sys.argv[1:])}`",
        "",
        "| path | total ms (median) | min | max | text_encoder ms | denoiser ms | vae_decoder ms | BLS hops ms | "
        "BLS hop ms (text / denoise / decode) | client + frontend ms | overhead vs in-process |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (totals, stages) in rows.items():
        median = statistics.median(totals)
        overhead = "—" if name.startswith("in-process") else f"{median - base:+.1f} ms ({(median / base - 1) * 100:+.1f} %)"
        lines.append(
            f"| {name} | {median:.1f} | {min(totals):.1f} | {max(totals):.1f} | {stages['text_encoder']:.1f} | "
            f"{stages['denoiser']:.1f} | {stages['vae_decoder']:.1f} | "
            + (f"{stages['bls']:.1f}" if "bls" in stages else "—")
            + " | "
            + (" / ".join(f"{stages.get(f'hop {k}', float('nan')):.1f}" for k in ("text_encoder", "denoiser", "vae_decoder"))
               if "bls" in stages else "—")
            + " | "
            + (f"{stages['client']:.1f}" if "client" in stages else "—")
            + f" | {overhead} |"
        )
    emit(lines, args.out)


if __name__ == "__main__":
    main()
