"""Is Python slower inside Triton's backend stub than in the interpreter? The same micro-benchmarks, both ways.

    .venv/bin/python -m bench.stub_speed [--out bench/results/serving/stub-speed-cpu.md]

The Python backend runs model code in `triton_python_backend_stub`, which embeds the shared libpython;
a distribution's `python3` binary may be linked statically (and built differently). The served stages'
CPU-bound parts (tokenising, launching many small kernels) run at the stub's speed. Three loops, timed in
this process and inside a throwaway Python model on a real tritonserver (medians of 5):
pure Python (function calls and arithmetic), small torch ops on the CPU, and small torch ops on the GPU
(kernel launches, when there is one).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import textwrap
from pathlib import Path

import numpy as np

from bench.report import emit
from smart_diffusion_backend.params import project_root
from smart_diffusion_backend.serving import TritonServer, free_port

LOOPS = '''
import statistics
import time


def _pure_python(n=200_000):
    def step(a, b):
        return (a * 31 + b) % 1_000_003

    acc = 0
    for i in range(n):
        acc = step(acc, i)
    return acc


def _torch_ops(device, n=2_000):
    import torch

    x = torch.ones(64, device=device)
    for _ in range(n):
        x = (x * 1.0001).add_(0.5).sub_(0.5)
    if device == "cuda":
        torch.cuda.synchronize()
    return x


def measure():
    """Median ms of 5 runs for each loop (one unmeasured run first)."""
    import torch

    loops = {"pure Python, 200k calls": _pure_python, "torch CPU, 6k small ops": lambda: _torch_ops("cpu")}
    if torch.cuda.is_available():
        loops["torch CUDA, 6k small ops"] = lambda: _torch_ops("cuda")
    results = {}
    for name, loop in loops.items():
        loop()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            loop()
            times.append((time.perf_counter() - started) * 1000)
        results[name] = statistics.median(times)
    return results
'''

MODEL = '''
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # speed_loops.py sits beside this file
from speed_loops import measure


class TritonPythonModel:
    def execute(self, requests):
        text = json.dumps(measure())
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("MS", np.array([text.encode()], dtype=np.object_))])
                for _ in requests]
'''

CONFIG = '''name: "speed"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "MS" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import json

    import tritonclient.http as httpclient

    root = project_root() / "build" / "stub_speed"
    (root / "speed" / "1").mkdir(parents=True, exist_ok=True)
    (root / "speed" / "1" / "model.py").write_text(textwrap.dedent(MODEL).lstrip())
    (root / "speed" / "1" / "speed_loops.py").write_text(textwrap.dedent(LOOPS).lstrip())
    (root / "speed" / "config.pbtxt").write_text(CONFIG)
    sys.path.insert(0, str(root / "speed" / "1"))
    from speed_loops import measure  # noqa: E402 - the very file the stub runs

    here = measure()
    http_port = free_port()
    server = TritonServer(root, http_port, free_port(), free_port(), backend_dir=project_root() / ".triton" / "backends",
                          log_file=project_root() / "build" / "stub_speed.log")
    with server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        x = httpclient.InferInput("X", [1], "INT32")
        x.set_data_from_numpy(np.array([0], np.int32))
        stub = json.loads(client.infer("speed", [x]).as_numpy("MS")[0])
    here_again = measure()

    import torch

    lines = [
        "# Python inside the backend stub vs the interpreter",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()} ({sys.executable}), "
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
        "Command: `python -m bench.stub_speed`; medians of 5 runs, ms.",
        "",
        "| loop | interpreter (before) | stub | interpreter (after) | stub / interpreter |",
        "|---|---|---|---|---|",
    ]
    for name in here:
        base = (here[name] + here_again[name]) / 2
        lines.append(f"| {name} | {here[name]:.1f} | {stub[name]:.1f} | {here_again[name]:.1f} | {stub[name] / base:.2f}× |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
