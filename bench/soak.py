"""Soak a real tritonserver (loopback only): mixed valid, invalid and hostile requests at fixed concurrency,
in rounds that each end with a different way of stopping the server.

Bounded by time AND count. Every valid request must succeed with the right image shape; every invalid
one must be answered INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT); every hostile direct call to an
internal stage must be refused (UNSUPPORTED, or Triton's own 400 for a shape that contradicts the config).
Each round starts `scripts/serve.py` in its own session, as `make serve` does, and ends by signalling it:
SIGTERM, SIGINT, SIGHUP to its process group, or SIGKILL of the launcher (the server then stops on its
parent-death signal). After each stop no process, port or /dev/shm region of it may remain. RSS of the
server tree is sampled throughout.

    .venv/bin/python -m bench.soak --duration-s 600 --concurrency 8 --out bench/results/soak/soak-cpu.md   # make soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from smart_diffusion_backend.serving import (
    child_pids,
    free_port,
    mapped_shm_regions,
    process_cmdline,
    rss_bytes,
    shm_regions,
    stop_on_signals,
)
from smart_diffusion_backend.wire import FIELDS
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

ROOT = Path(__file__).resolve().parent.parent

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
    def __init__(self, server, duration_s: float, max_requests: int, concurrency: int, invalid_ratio: float,
                 hostile_ratio: float = 0.0, seed: int = 0):
        self.server, self.duration_s, self.max_requests = server, duration_s, max_requests
        self.concurrency, self.invalid_ratio, self.hostile_ratio, self.seed = concurrency, invalid_ratio, hostile_ratio, seed
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
        rng = random.Random(self.seed * 1000 + index)
        clients = {"http": SmartDiffusionClient(self.server.http_url, "http"), "grpc": SmartDiffusionClient(self.server.grpc_url, "grpc")}
        try:
            while self._take():
                if rng.random() < self.hostile_ratio:
                    outcome = hostile_call(self.server.http_url, rng)
                    self._record(f"hostile {'ok' if outcome == 'ok' else 'WRONG'}", None if outcome == "ok" else outcome)
                    continue
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
                    elif result.image.shape != (request.height, request.width, 3):  # the first of IMAGE [N, H, W, 3]
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


HOSTILE_SHAPES = {  # direct calls to the internal stages, none with a grant
    "vae_decoder": [("LATENTS", (1, 16, 256, 256)), ("LATENTS", (1, 16, 8, 8)), ("LATENTS", (16, 8, 8))],
    "denoiser": [("PROMPT_EMBEDS", (1, 100_000, 64)), ("PROMPT_EMBEDS", (1, 64, 64))],
    "text_encoder": [("PROMPT", (1,))],
}


def hostile_call(url: str, rng: random.Random) -> str:
    """One direct call to an internal stage with a hostile tensor; "ok" when refused as it must be."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    model = rng.choice(sorted(HOSTILE_SHAPES))
    name, shape = rng.choice(HOSTILE_SHAPES[model])
    if name == "PROMPT":
        array = np.array([b"a cat"], dtype=np.object_)
    else:
        array = np.full(shape, rng.choice([0.0, np.nan, np.inf]), np.float32)
    arrays = {name: array}
    if model == "denoiser":  # a complete set of inputs, so the refusal is the stage's (or the config's)
        arrays["POOLED_PROMPT_EMBEDS"] = np.zeros((1, 64), np.float32)
    tensors = []
    for tensor_name, value in arrays.items():
        tensors.append(httpclient.InferInput(tensor_name, list(value.shape), "BYTES" if value.dtype == object else "FP32"))
        tensors[-1].set_data_from_numpy(value)
    client = httpclient.InferenceServerClient(url, network_timeout=60)
    try:
        client.infer(model, tensors)
        return f"{model} {name}{list(shape)}: answered OK"
    except InferenceServerException as exc:
        internal = exc.status() == "501" and "is an internal stage" in exc.message()
        refused_by_triton = exc.status() == "400" and "unexpected shape" in exc.message()
        return "ok" if internal or refused_by_triton else f"{model} {name}{list(shape)}: [{exc.status()}] {exc.message()}"
    finally:
        client.close()


STOPS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGKILL launcher")


class LaunchedServer:
    """scripts/serve.py in its own session, as `make serve` runs it; stopped by a signal, then checked."""

    def __init__(self, model: str, system: str, log: Path) -> None:
        self.ports = [free_port(), free_port(), free_port()]
        self.http_url, self.grpc_url = f"127.0.0.1:{self.ports[0]}", f"127.0.0.1:{self.ports[1]}"
        with open(log, "ab") as out:
            self.launcher = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", model, "--system", system,
                 "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
                 "--metrics-port", str(self.ports[2]), "--openai-port", "0"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + 600
        while not SmartDiffusionClient(self.http_url).is_ready():
            if self.launcher.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve.py exited or was not ready (exit {self.launcher.poll()}); see {log}")
            time.sleep(0.5)

    def process_tree(self) -> set[int]:
        return child_pids(self.launcher.pid) | {self.launcher.pid}

    def stop(self, how: str, within_s: float = 30.0) -> dict:
        """Signal the launcher as `how` says; what of it is left after `within_s` (processes, ports, shm)."""
        pids = self.process_tree()
        regions = mapped_shm_regions(pids)
        started = time.monotonic()
        if how == "SIGKILL launcher":
            os.kill(self.launcher.pid, signal.SIGKILL)
        else:
            os.killpg(self.launcher.pid, getattr(signal, how))
        while True:
            left = [f"{p} {process_cmdline(p)[:100]}" for p in sorted(pids) if _running(p)]
            left += [f"port {p}" for p in self.ports if not _port_free(p)]
            left += [f"/dev/shm/{r}" for r in sorted(regions & shm_regions())]
            if not left or time.monotonic() - started > within_s:
                break
            time.sleep(0.2)
        self.launcher.wait(timeout=5)
        return {"how": how, "seconds": round(time.monotonic() - started, 1), "left": left}


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--invalid-ratio", type=float, default=0.3)
    parser.add_argument("--hostile-ratio", type=float, default=0.05, help="direct calls to the internal stages")
    parser.add_argument("--rounds", type=int, default=len(STOPS), help="server restarts, each stopped differently")
    parser.add_argument("--model", default="shapes-flux")
    parser.add_argument("--system", default="cpu")
    parser.add_argument("--out", default="", help="markdown summary (e.g. bench/results/soak/soak-cpu.md)")
    parser.add_argument("--work-dir", default=str(ROOT / "build" / "soak"))
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "serve.log"
    log.unlink(missing_ok=True)
    rounds, totals, stops = [], Counter(), []
    server: LaunchedServer | None = None
    with stop_on_signals():  # SIGTERM/SIGINT/SIGHUP to the soak: stop its server in order, then exit
        try:
            for index in range(args.rounds):
                how = STOPS[index % len(STOPS)]
                server = LaunchedServer(args.model, args.system, log)
                with SmartDiffusionClient(server.http_url) as client:  # warm every stage once
                    client.infer(Request(prompt="warm up", height=64, width=64, steps=2, seed=0))
                rss_start = sum(rss_bytes(server.process_tree()).values())
                print(f"soak round {index + 1}/{args.rounds}: {args.concurrency} clients, "
                      f"{args.duration_s / args.rounds:.0f} s, server RSS {rss_start >> 20} MiB, then {how}", flush=True)
                soak = Soak(server, args.duration_s / args.rounds, args.max_requests // args.rounds, args.concurrency,
                            args.invalid_ratio, args.hostile_ratio, seed=index)
                result = soak.run()
                rss_end = sum(rss_bytes(server.process_tree()).values())
                stop = server.stop(how)
                server = None
                stops.append(stop)
                totals.update(result["counts"])
                rounds.append({**result, "rss_start_mib": rss_start >> 20, "rss_end_mib": rss_end >> 20, "stop": stop})
        finally:
            if server is not None:  # the soak itself was stopped mid-round
                server.stop("SIGTERM")
    latencies = np.array([x for r in rounds for x in r.pop("latencies")] or [0.0])
    summary = {
        "rounds": rounds, "counts": dict(totals), "stops": stops,
        "failures": [f for r in rounds for f in r["failures"]][:50],
        "valid_latency_s": {"p50": round(float(np.percentile(latencies, 50)), 3),
                            "p99": round(float(np.percentile(latencies, 99)), 3)},
    }
    (work / "soak.json").write_text(json.dumps(summary, indent=1))
    bad = ("valid FAILED", "invalid WRONG", "hostile WRONG")
    passed = not any(totals.get(k) for k in bad) and all(not s["left"] for s in stops)
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if args.out:
        write_markdown(Path(args.out), summary, args, passed)
    return 0 if passed else 1


def write_markdown(path: Path, s: dict, args, passed: bool) -> None:
    c = s["counts"]
    rows = []
    for n, r in enumerate(s["rounds"], start=1):
        rc, stop = r["counts"], r["stop"]
        rows.append(
            f"| {n} | {r['seconds']} | {rc.get('valid ok', 0)} / {rc.get('valid FAILED', 0)} | "
            f"{rc.get('invalid ok', 0)} / {rc.get('invalid WRONG', 0)} | {rc.get('hostile ok', 0)} / "
            f"{rc.get('hostile WRONG', 0)} | {r['rss_start_mib']} → {r['rss_end_mib']} | {stop['how']} | "
            f"{stop['seconds']} | {len(stop['left'])} |"
        )
    table = "\n".join(rows)
    path.write_text(f"""# Soak: {args.model} on CPU, real tritonserver 2.51 (loopback)

`python -m bench.soak --duration-s {args.duration_s:.0f} --concurrency {args.concurrency} --invalid-ratio {args.invalid_ratio} --hostile-ratio {args.hostile_ratio} --rounds {args.rounds}`
(`make soak`), system `{args.system}`, on the 2-core development machine. Each round starts
`scripts/serve.py` in its own session (as `make serve`), warms it, runs the mixed load, then stops it
the round's way and checks that no process, port or /dev/shm region of it is left within 30 s.
Routes mixed at random: `smart_diffusion` and `smart_diffusion_ensemble` over HTTP and gRPC,
`smart_diffusion_stream` over gRPC and HTTP SSE; valid requests 32–128 px, 1–4 steps, cache ratio
0/0.5; invalid ones from the field table of tests/test_server.py plus raw wrong dtype / shape / unknown
input / missing PROMPT; hostile ones are direct calls to the internal stages without a grant (latents
up to [1, 16, 256, 256], 100,000 text tokens, wrong rank, NaN/Inf), which must be refused.

**{"PASS" if passed else "FAIL"}**: valid ok / failed {c.get("valid ok", 0)} / {c.get("valid FAILED", 0)};
invalid answered INVALID_ARG / otherwise {c.get("invalid ok", 0)} / {c.get("invalid WRONG", 0)};
hostile refused / otherwise {c.get("hostile ok", 0)} / {c.get("hostile WRONG", 0)};
valid latency p50 / p99 {s["valid_latency_s"]["p50"]} s / {s["valid_latency_s"]["p99"]} s.

| round | s | valid ok / failed | invalid ok / wrong | hostile refused / wrong | RSS MiB start → end | stopped by | stop s | left |
|---|---|---|---|---|---|---|---|---|
{table}

Left after the stops: {[stop["left"] for stop in s["stops"] if stop["left"]] or "nothing"}

Failures (first 50): {s["failures"] or "none"}
""")


if __name__ == "__main__":
    sys.exit(main())
