"""`make demo`: start a real tritonserver on the default model, generate one image, stop the server.

SIGTERM, SIGINT or SIGHUP, mid-start or mid-request, stop the server in order; the demo then exits
with 128 + the signal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smart_diffusion_backend.params import project_root
from smart_diffusion_backend.serving import TritonServer, stop_on_signals
from smart_diffusion_client import Request, SmartDiffusionClient
from smart_diffusion_client.__main__ import _save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo.png"))
    parser.add_argument("--prompt", default="a large yellow triangle on a blue background, top left")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args()

    root = project_root()
    log = root / "outputs" / "demo-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    server = TritonServer(
        root / "model_repository", args.http_port, args.grpc_port, args.metrics_port,
        backend_dir=root / ".triton" / "backends", log_file=log,
    )
    started = time.perf_counter()
    with stop_on_signals(), server:
        print(f"tritonserver ready in {time.perf_counter() - started:.1f} s (log: {log})")
        with SmartDiffusionClient(server.grpc_url, "grpc") as client:
            result = client.stream(
                Request(prompt=args.prompt, seed=args.seed),
                on_progress=lambda step, total: print(f"  step {step}/{total}"),
            )
    _save(result.image, args.out, fps=16)
    print(f"wrote {args.out} {result.image.shape}; stats: {json.dumps(result.stats)}")
    print("server stopped")


if __name__ == "__main__":
    main()
