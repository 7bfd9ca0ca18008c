#!/usr/bin/env python3
"""Every served path of a GPU system on the tiny Flux, in about a minute: the BLS orchestrator, the
ensemble and the stream, text-to-image, image-to-image and inpainting, each twice (the second must equal the
first), and the ensemble's image must equal the orchestrator's.

GPU instances keep stage tensors in GPU memory between the stages (DLPack, BLS preferred memory), a path the
CPU test suite cannot reach; run this on a GPU host after changing the orchestrator or the stage wire:

    python scripts/gpu_served_smoke.py --system gpu-1 [--out build/gpu-smoke.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smart_diffusion_backend.params import ModelParams  # noqa: E402
from smart_diffusion_backend.repository import write_repository  # noqa: E402
from smart_diffusion_backend.serving import TritonServer, free_port  # noqa: E402
from smart_diffusion_backend.tiny_models import TINY_BUILDERS  # noqa: E402
from smart_diffusion_client import Request, SmartDiffusionClient  # noqa: E402


def cases(size: int) -> dict[str, Request]:
    grid = np.indices((size, size)).sum(0)
    image = np.stack([grid % 256, (2 * grid) % 256, np.full_like(grid, 128)], -1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    base = dict(prompt="a red circle", height=size, width=size, steps=4, seed=7)
    return {
        "text-to-image": Request(**base),
        "image-to-image": Request(**base, input_image=image, strength=0.6),
        "inpainting": Request(**base, input_image=image, mask_image=mask, strength=0.9),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="gpu-1")
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    weights = ModelParams.load(args.model).weights
    if not (weights / "model_index.json").is_file():
        TINY_BUILDERS[args.model](weights)
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    write_repository(work / "repo", [args.model], args.system)
    server = TritonServer(work / "repo", free_port(), free_port(), free_port(), backend_dir=ROOT / ".triton" / "backends",
                          log_file=work / "server.log")
    rows, failed = [], 0
    server.start(ready_timeout_s=600)
    try:
        with SmartDiffusionClient(server.http_url, "http", timeout_s=300) as client:
            for name, request in cases(args.size).items():
                # The stream over HTTP carries no image (generate_stream takes 1-D values); gRPC does.
                streams = ("smart_diffusion_stream",) if request.input_image is None else ()
                bls = None  # the orchestrator's image, which the other entry models must equal
                for model in ("smart_diffusion", "smart_diffusion_ensemble", *streams):
                    started = time.perf_counter()
                    try:
                        if model == "smart_diffusion_stream":
                            first = client.stream(request)
                        else:
                            first = client.infer(request, model=model)
                        again = client.infer(request, model=model) if model != "smart_diffusion_stream" else first
                        if model == "smart_diffusion":
                            bls = first
                        same = np.array_equal(first.images, again.images) and np.array_equal(first.images, bls.images)
                        verdict = "ok" if same else "MISMATCH"
                    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
                        verdict = f"FAILED: {type(exc).__name__}: {exc}"[:200]
                    failed += verdict != "ok"
                    rows.append(f"| {name} | {model} | {verdict} | {time.perf_counter() - started:.2f} |")
                    if server.process.poll() is not None:
                        rows.append("| server | — | DIED (see its log) | — |")
                        raise SystemExit(1)
    finally:
        server.stop()
        log_tail = (work / "server.log").read_text(errors="replace")[-4000:] if failed else ""
    report = "\n".join([f"# Served smoke: {args.model} on {args.system}", "",
                        "| case | entry model | result | s |", "|---|---|---|---|", *rows, ""])
    print(report)
    if log_tail:
        print("server log tail:\n" + log_tail)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
