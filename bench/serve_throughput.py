"""Serving throughput vs concurrency on a real tritonserver (loopback): `make bench-serve`.

1. Serial baseline: N requests one after another through `smart_diffusion`; per-stage times from STATS.
   The overlap target is 0.9 / (slowest stage's mean time): the denoiser (or decoder) never idles.
2. The same request from 1/2/4/8 concurrent clients (gRPC) against `smart_diffusion` (BLS) and
   `smart_diffusion_ensemble`: requests/s.
3. perf_analyzer (if installed in .pa/, see shared/TRITON_SETUP.md) against the ensemble and the
   BLS model over HTTP and gRPC and the stream model with --streaming, per bench/perf_analyzer/runs.json.

    .venv/bin/python -m bench.serve_throughput --out bench/results/serving/serve-throughput-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from smart_diffusion_backend.repository import write_repository
from smart_diffusion_backend.serving import TritonServer, free_port, stop_on_signals
from smart_diffusion_client import Request, SmartDiffusionClient

ROOT = Path(__file__).resolve().parent.parent
PA_DIR = ROOT / ".pa"
PA_BIN = PA_DIR / "bin" / "perf_analyzer"
PA_CONFIG = ROOT / "bench" / "perf_analyzer"


def serial(server: TritonServer, request: Request, n: int) -> dict:
    stages: dict[str, list[float]] = {}
    with SmartDiffusionClient(server.grpc_url, "grpc") as client:
        client.infer(request)  # warm
        started = time.perf_counter()
        for _ in range(n):
            stats = client.infer(request).stats
            for stage, ms in stats["stages_ms"].items():
                stages.setdefault(stage, []).append(ms)
            stages.setdefault("total", []).append(stats["total_ms"])
        seconds = time.perf_counter() - started
    return {"throughput": n / seconds, "stage_ms": {k: statistics.mean(v) for k, v in stages.items()}}


def concurrent(server: TritonServer, request: Request, model: str, concurrency: int, n: int) -> float:
    """requests/s of `n` requests spread over `concurrency` client threads (each its own connection)."""
    counter = iter(range(n))
    lock = threading.Lock()
    errors: list[str] = []
    ready = threading.Barrier(concurrency + 1)  # connections made and warm before the clock starts

    def worker() -> None:
        with SmartDiffusionClient(server.grpc_url, "grpc") as client:
            client.infer(request, model=model)
            ready.wait()
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                try:
                    client.infer(request, model=model)
                except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
                    errors.append(str(exc))

    # Daemons: a stop signal may leave some waiting at the barrier, and they must not hold the exit.
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return n / seconds


def perf_analyzer(server: TritonServer, run: dict, input_file: Path, concurrency: list[int], count: int) -> dict[int, float | None]:
    """infer/s per concurrency; None where perf_analyzer found no stable measurement."""
    url = server.http_url if run["protocol"] == "http" else server.grpc_url
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(PA_DIR / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "nvidia" / "cuda_runtime" / "lib")
    cmd = [
        str(PA_BIN), "-m", run["model"], "-u", url, "-i", run["protocol"], "--input-data", str(input_file),
        "--concurrency-range", str(concurrency[0]),
        "--measurement-mode", "count_windows", "--measurement-request-count", str(count), "--max-trials", "8",
        "--stability-percentage", "60",  # 2 shared cores: perf_analyzer's default 10 % never settles
    ]
    if run.get("streaming"):
        cmd.append("--streaming")
    results = {}
    for c in concurrency:
        cmd[cmd.index("--concurrency-range") + 1] = str(c)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        match = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", done.stdout)
        if not match and "Failed to obtain stable measurement" in done.stdout + done.stderr:
            results[c] = None
            continue
        if not match:
            raise RuntimeError(f"perf_analyzer failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        results[c] = float(match.group(1))
    return results


def bench_system(model_name: str, system: str, request: Request, levels: list[int], n: int, use_perf_analyzer: bool) -> dict:
    work = ROOT / "build" / "bench-serve" / system
    repo = work / "repo"
    write_repository(repo, [model_name], system)
    server = TritonServer(repo, free_port(), free_port(), free_port(), backend_dir=ROOT / ".triton" / "backends",
                          log_file=work / "tritonserver.log")
    server.start(ready_timeout_s=600)
    report: dict = {"request": request.__dict__, "model": model_name, "system": system, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    try:
        report["serial"] = serial(server, request, n)
        slowest = max(v for k, v in report["serial"]["stage_ms"].items() if k != "total")
        report["target"] = 0.9 / (slowest / 1000)
        print(system, json.dumps(report["serial"]), f"target {report['target']:.2f} req/s", flush=True)
        report["client"] = {}
        for model in ("smart_diffusion", "smart_diffusion_ensemble"):
            report["client"][model] = {c: concurrent(server, request, model, c, n) for c in levels}
            print(system, model, report["client"][model], flush=True)
        if use_perf_analyzer and PA_BIN.exists():
            runs = json.loads((PA_CONFIG / "runs.json").read_text())
            input_file = PA_CONFIG / f"input-{request.height}x{request.width}-{request.steps}steps.json"
            if not input_file.exists():
                raise SystemExit(f"no perf_analyzer input data {input_file}")
            report["perf_analyzer"] = {}
            for run in runs["runs"]:
                key = f"{run['model']} {run['protocol']}{' --streaming' if run.get('streaming') else ''}"
                report["perf_analyzer"][key] = perf_analyzer(server, run, input_file, levels, runs["measurement_request_count"])
                print(system, key, report["perf_analyzer"][key], flush=True)
        elif use_perf_analyzer:
            print(f"perf_analyzer not installed at {PA_BIN}: see shared/TRITON_SETUP.md (make bench-serve installs it)")
    finally:
        report["load_avg_end"] = os.getloadavg()
        server.stop()
    (work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="tiny-flux", help="model yaml served")
    parser.add_argument("--systems", default="cpu,cpu-1thread", help="system yamls, one server each")
    parser.add_argument("--requests", type=int, default=24, help="per measurement")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    request = Request(prompt="a red circle on a blue background", height=args.height, width=args.width, steps=args.steps, seed=42)
    with stop_on_signals():  # SIGTERM/SIGINT/SIGHUP: stop the server in order, then exit 128 + signal
        reports = [bench_system(args.model, s, request, levels, args.requests, not args.no_perf_analyzer) for s in args.systems.split(",")]
    if args.out:
        write_markdown(Path(args.out), reports, levels)
    return 0


def write_markdown(path: Path, reports: list[dict], levels: list[int]) -> None:
    q = reports[0]["request"]
    sections = []
    for r in reports:
        s = r["serial"]
        stages = " · ".join(f"{k} {v:.0f} ms" for k, v in s["stage_ms"].items())
        rows = []
        for model, by_c in r["client"].items():
            rows.append(f"| {model} (bench client, gRPC) | " + " | ".join(f"{by_c[c]:.2f}" for c in levels) + " |")
        for key, by_c in r.get("perf_analyzer", {}).items():
            cells = ("unstable" if by_c[c] is None else f"{by_c[c]:.2f}" for c in levels)
            rows.append(f"| {key} (perf_analyzer) | " + " | ".join(cells) + " |")
        best = max(r["client"]["smart_diffusion"].values())
        sections.append(f"""## system `{r["system"]}`

Load average (1 min) at start {r["load_avg_start"][0]:.1f}, at end {r["load_avg_end"][0]:.1f}.
Serial (`smart_diffusion`, gRPC, one request after another): **{s["throughput"]:.2f} req/s**; mean times {stages}.
Target with overlap, 0.9 / slowest stage: **{r["target"]:.2f} req/s**. Best `smart_diffusion`: **{best:.2f} req/s**
({best / r["target"]:.0%} of the target, {best / s["throughput"]:.2f}x serial).

requests/s at concurrency:

| entry point | {" | ".join(str(c) for c in levels)} |
|---|{"---|" * len(levels)}
{chr(10).join(rows)}
""")
    import platform

    import torch

    card = f", {torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    path.write_text(f"""# Serving throughput vs concurrency: {reports[0]["model"]} (tritonserver 2.51, loopback)

`make bench-serve` (`python -m bench.serve_throughput`): request {q["height"]}x{q["width"]}, {q["steps"]} steps, one seed;
{platform.machine()} with {reports[0]["cpus"]} cores{card}, torch {torch.__version__}.
Command: `python -m bench.serve_throughput {" ".join(sys.argv[1:])}`.
perf_analyzer (where installed): the 2.51 build from tritonclient 2.51 in `.pa/`, inputs in
bench/perf_analyzer/, count windows of 12 requests, stability 60 %.

""" + "\n".join(sections))


if __name__ == "__main__":
    sys.exit(main())
