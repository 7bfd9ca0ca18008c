"""Soak a real tritonserver (loopback only): mixed valid and invalid requests at fixed concurrency.

Bounded by time AND count. Every valid request must succeed with the right image shape; every invalid
one must be answered INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT). Reports RSS of the server tree
over time, then stops the server and checks its exit code, leftover processes and /dev/shm regions.

    .venv/bin/python scripts/soak.py --duration-s 600 --concurrency 8 --out bench/results/soak-cpu.md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import GenerationError, Request, SmartDiffusionClient  # noqa: E402
from smart_diffusion_backend.wire import FIELDS  # noqa: E402
from smart_diffusion_backend.serving import (  # noqa: E402
    TritonServer,
    child_pids,
    free_port,
    mapped_shm_regions,
    process_cmdline,
    rss_bytes,
    shm_regions,
    stop_on_signals,
)

ROUTES = [("http", "smart_diffusion"), ("grpc", "smart_diffusion"), ("http", "smart_diffusion_ensemble"),
          ("grpc", "smart_diffusion_ensemble"), ("grpc", "stream"), ("http", "stream")]
BAD = [
    dict(height=65), dict(width=2048), dict(steps=0), dict(steps=500), dict(guidance_scale=float("nan")),
    dict(guidance_scale=-3.0), dict(cache_ratio=2.0), dict(seed=-5), dict(prompt=""), dict(prompt="x" * 5000),
    dict(negative_prompt="blurry"), dict(height=4096, width=4096),
]
RAW_BAD = ["float_steps", "two_heights", "unknown_input", "no_prompt"]  # dtype/shape/name errors, raw tritonclient


def valid_request(rng: random.Random) -> Request:
    return Request(
        prompt=rng.choice(["a cat", "a red circle", "ünïcödé prompt ✓", "x" * 200]),
        height=rng.choice([32, 64, 96]), width=rng.choice([32, 64, 128]),
        steps=rng.randint(1, 4), cache_ratio=rng.choice([None, 0.0, 0.5]), seed=rng.randrange(2**31),
    )


def is_invalid_arg(exc: GenerationError, model: str) -> bool:
    """HTTP 400 / gRPC INVALID_ARGUMENT; a gRPC stream's error callback carries no code, so there
    the message must name the offending field (`HEIGHT: ...`), as INVALID_ARG messages do."""
    if str(exc.status) in ("400", "StatusCode.INVALID_ARGUMENT"):
        return True
    fields = (*FIELDS, "HEIGHT*WIDTH")
    return model == "stream" and exc.status in (None, "None") and any(str(exc).startswith(f"{f}:") for f in fields)


def raw_invalid(url: str, kind: str) -> str:
    """Send one malformed request with tritonclient HTTP; returns the status string."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    def tensor(name, array, dtype):
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    prompt = tensor("PROMPT", np.array([b"a cat"], dtype=np.object_), "BYTES")
    inputs = {
        "float_steps": [prompt, tensor("STEPS", np.array([4.0], np.float32), "FP32")],
        "two_heights": [prompt, tensor("HEIGHT", np.array([64, 64], np.int32), "INT32")],
        "unknown_input": [prompt, tensor("COLOR", np.array([1], np.int32), "INT32")],
        "no_prompt": [tensor("STEPS", np.array([4], np.int32), "INT32")],
    }[kind]
    client = httpclient.InferenceServerClient(url, network_timeout=600)
    try:
        client.infer("smart_diffusion", inputs)
        return "succeeded"
    except InferenceServerException as exc:
        return str(exc.status())
    finally:
        client.close()


class Soak:
    def __init__(self, server: TritonServer, duration_s: float, max_requests: int, concurrency: int, invalid_ratio: float):
        self.server, self.duration_s, self.max_requests = server, duration_s, max_requests
        self.concurrency, self.invalid_ratio = concurrency, invalid_ratio
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.sent = 0

    def _take(self) -> bool:
        with self.lock:
            if self.sent >= self.max_requests or time.monotonic() > self.deadline:
                return False
            self.sent += 1
            return True

    def _record(self, key: str, failure: str | None = None, latency: float | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if failure:
                self.failures.append(failure)
            if latency is not None:
                self.latencies.append(latency)

    def worker(self, index: int) -> None:
        rng = random.Random(index)
        clients = {"http": SmartDiffusionClient(self.server.http_url, "http"), "grpc": SmartDiffusionClient(self.server.grpc_url, "grpc")}
        try:
            while self._take():
                protocol, model = rng.choice(ROUTES)
                invalid = rng.random() < self.invalid_ratio
                if invalid and rng.random() < 0.3:
                    kind = rng.choice(RAW_BAD)
                    status = raw_invalid(self.server.http_url, kind)
                    ok = status == "400"
                    self._record(f"invalid {'ok' if ok else 'WRONG'}", None if ok else f"raw {kind}: {status}")
                    continue
                request = valid_request(rng)
                if invalid:
                    request = Request(**{**request.__dict__, **rng.choice(BAD)})
                started = time.monotonic()
                try:
                    client = clients[protocol]
                    result = client.stream(request) if model == "stream" else client.infer(request, model=model)
                    if invalid:
                        self._record("invalid WRONG", f"{protocol} {model} {request}: succeeded")
                    elif result.image.shape != (request.height, request.width, 3):
                        self._record("valid FAILED", f"{protocol} {model}: shape {result.image.shape}")
                    else:
                        self._record("valid ok", latency=time.monotonic() - started)
                except GenerationError as exc:
                    text = f"{exc.status} {exc}"
                    if invalid:
                        ok = is_invalid_arg(exc, model)
                        self._record(f"invalid {'ok' if ok else 'WRONG'}", None if ok else f"{protocol} {model}: {text}")
                    else:
                        self._record("valid FAILED", f"{protocol} {model} {request}: {text}")
        finally:
            for c in clients.values():
                c.close()

    def run(self) -> dict:
        self.deadline = time.monotonic() + self.duration_s
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.concurrency)]
        rss = []
        started = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((round(time.monotonic() - started), sum(rss_bytes(self.server.process_tree()).values())))
            for t in threads:
                t.join(timeout=30 / len(threads))
        rss.append((round(time.monotonic() - started), sum(rss_bytes(self.server.process_tree()).values())))
        return {"seconds": round(time.monotonic() - started, 1), "counts": dict(self.counts), "failures": self.failures[:50],
                "rss_samples": rss, "latencies": self.latencies}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--invalid-ratio", type=float, default=0.3)
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--out", default="", help="markdown summary (e.g. bench/results/soak-cpu.md)")
    parser.add_argument("--work-dir", default=str(ROOT / "build" / "soak"))
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "tritonserver.log"
    log.unlink(missing_ok=True)
    server = TritonServer(Path(args.repository), free_port(), free_port(), free_port(),
                          backend_dir=ROOT / ".triton" / "backends", log_file=log)
    with stop_on_signals():  # SIGTERM/SIGINT/SIGHUP: stop the server in order, then exit 128 + signal
        server.start(ready_timeout_s=600)
        try:
            with SmartDiffusionClient(server.http_url) as client:  # warm every stage once
                client.infer(Request(prompt="warm up", height=64, width=64, steps=2, seed=0))
            rss_start = sum(rss_bytes(server.process_tree()).values())
            processes_start = len(server.process_tree())
            print(f"soak: {args.concurrency} clients, {args.duration_s:.0f} s, server RSS {rss_start >> 20} MiB", flush=True)
            result = Soak(server, args.duration_s, args.max_requests, args.concurrency, args.invalid_ratio).run()
        finally:
            pids = server.process_tree()
            ours = mapped_shm_regions(pids)
            processes_end = len(pids)
            rss_end = sum(rss_bytes(pids).values())
            code = server.stop()
            time.sleep(3)
            orphans = [f"{p} {process_cmdline(p)[:120]}" for p in pids if Path(f"/proc/{p}").exists() and process_cmdline(p)]
            leaked = sorted(ours & shm_regions())
    lat = np.array(result.pop("latencies") or [0.0])
    counts = result["counts"]
    summary = {
        **result, "rss_start_mib": rss_start >> 20, "rss_end_mib": rss_end >> 20, "exit_code": code,
        "processes_start": processes_start, "processes_end": processes_end, "orphans": orphans, "leaked_shm": leaked,
        "valid_latency_s": {"p50": round(float(np.percentile(lat, 50)), 3), "p99": round(float(np.percentile(lat, 99)), 3)},
    }
    (work / "soak.json").write_text(json.dumps(summary, indent=1))
    passed = not counts.get("valid FAILED") and not counts.get("invalid WRONG") and code == 0 and not orphans and not leaked
    print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples"}, indent=1))
    if args.out:
        write_markdown(Path(args.out), summary, args, passed)
    return 0 if passed else 1


def write_markdown(path: Path, s: dict, args, passed: bool) -> None:
    c = s["counts"]
    rss = ", ".join(f"{t}s: {b >> 20}" for t, b in s["rss_samples"][:: max(1, len(s["rss_samples"]) // 12)])
    path.write_text(f"""# Soak: tiny-flux on CPU, real tritonserver 2.51 (loopback)

`scripts/soak.py --duration-s {args.duration_s:.0f} --concurrency {args.concurrency} --invalid-ratio {args.invalid_ratio}`
(`make soak`), committed `model_repository/` (system `cpu`), on the shared 2-core development machine
(other agents' servers were running). Routes mixed at random: `smart_diffusion` and
`smart_diffusion_ensemble` over HTTP and gRPC, `smart_diffusion_stream` over gRPC and HTTP SSE; valid
requests 32–128 px, 1–4 steps, cache ratio 0/0.5; invalid ones from the field table of
tests/test_server.py plus raw wrong dtype / shape / unknown input / missing PROMPT.

| | |
|---|---|
| result | **{"PASS" if passed else "FAIL"}** |
| wall time | {s["seconds"]} s |
| valid requests ok / failed | {c.get("valid ok", 0)} / {c.get("valid FAILED", 0)} |
| invalid requests answered INVALID_ARG / otherwise | {c.get("invalid ok", 0)} / {c.get("invalid WRONG", 0)} |
| valid latency p50 / p99 | {s["valid_latency_s"]["p50"]} s / {s["valid_latency_s"]["p99"]} s |
| RSS of server + stubs, start → end | {s["rss_start_mib"]} MiB → {s["rss_end_mib"]} MiB |
| processes under the server, start → end | {s["processes_start"]} → {s["processes_end"]} |
| server exit code (SIGTERM) | {s["exit_code"]} |
| processes left after exit | {len(s["orphans"])} |
| /dev/shm regions left after exit | {len(s["leaked_shm"])} |

RSS samples (MiB): {rss}

Failures (first 50): {s["failures"] or "none"}
""")


if __name__ == "__main__":
    sys.exit(main())
