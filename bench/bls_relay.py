"""What a BLS hop costs per tensor, by dtype and memory: the choice behind the stage wire format.

    .venv/bin/python -m bench.bls_relay [--mib 8 1 3] [--repeats 20] [--out bench/results/serving/bls-relay-cpu.md]

Starts a real tritonserver with three throwaway Python models (written under build/bls_relay):
`source` makes a tensor of N elements (float32 or bfloat16, host or GPU memory), `sink` receives it
(FORCE_CPU_ONLY_INPUT_TENSORS off, so a GPU tensor may stay on the GPU) and returns its sum and where it
lived, and `relay` (the orchestrator's role) calls source, then passes the response tensors to sink as
they are (a BYTES tensor rides along, as STATS does between the stages), timing both calls. Every variant checks the sum, so a relay that loses or moves data fails loudly.
On a host without a GPU only the host-memory variants run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import textwrap
from pathlib import Path

import numpy as np

from bench.report import emit
from smart_diffusion_backend.params import project_root
from smart_diffusion_backend.serving import TritonServer, free_port, host_has_gpu

SOURCE = '''
import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy()[0])
            on_gpu = bool(pb_utils.get_input_tensor_by_name(request, "ON_GPU").as_numpy()[0])
            bf16 = bool(pb_utils.get_input_tensor_by_name(request, "BF16").as_numpy()[0])
            x = torch.arange(n, dtype=torch.float32).remainder_(7.0)  # sum is exact in float64
            x = x.to("cuda" if on_gpu else "cpu", torch.bfloat16 if bf16 else torch.float32)
            if not on_gpu and not bf16:
                tensor = pb_utils.Tensor("X_FP32", x.numpy())
            else:
                tensor = pb_utils.Tensor.from_dlpack("X_BF16" if bf16 else "X_FP32", torch.utils.dlpack.to_dlpack(x))
            note = pb_utils.Tensor("NOTE", np.array([b"stats ride along"], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor, note]))
        return responses
'''

SINK = '''
import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "X_FP32") or pb_utils.get_input_tensor_by_name(request, "X_BF16")
            note = pb_utils.get_input_tensor_by_name(request, "NOTE")
            if note is not None and (not note.is_cpu() or note.as_numpy()[0] != b"stats ride along"):
                raise ValueError("the BYTES tensor relayed beside a GPU tensor arrived wrong")
            on_gpu = not tensor.is_cpu()
            x = torch.utils.dlpack.from_dlpack(tensor.to_dlpack()) if (on_gpu or tensor.name() == "X_BF16") else torch.from_numpy(tensor.as_numpy())
            total = float(x.double().sum())
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("SUM", np.array([total], np.float64)),
                pb_utils.Tensor("ON_GPU", np.array([int(x.is_cuda)], np.int32)),
            ]))
        return responses
'''

RELAY = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils


def call(model, inputs, outputs, gpu_out):
    kwargs = {}
    if gpu_out:
        kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, 0)
    result = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs, **kwargs).exec()
    if result.has_error():
        raise pb_utils.TritonModelException(result.error().message())
    return [pb_utils.get_output_tensor_by_name(result, name) for name in outputs]


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            on_gpu, bf16 = bool(get("ON_GPU")[0]), bool(get("BF16")[0])
            name = "X_BF16" if bf16 else "X_FP32"
            started = time.perf_counter()
            x, note = call("source", [pb_utils.Tensor(n, get(n)) for n in ("N", "ON_GPU", "BF16")], [name, "NOTE"], on_gpu)
            between = time.perf_counter()
            total, where = call("sink", [x, note], ["SUM", "ON_GPU"], False)
            ended = time.perf_counter()
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("SUM", total.as_numpy()),
                pb_utils.Tensor("SINK_ON_GPU", where.as_numpy()),
                pb_utils.Tensor("RELAYED_ON_GPU", np.array([int(not x.is_cpu())], np.int32)),
                pb_utils.Tensor("MS", np.array([(between - started) * 1e3, (ended - between) * 1e3], np.float64)),
            ]))
        return responses
'''


def config(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]], kind: str, extra: str = "") -> str:
    def tensor(n: str, t: str, optional: bool = False) -> str:
        return f'  {{ name: "{n}" data_type: {t} dims: [ -1 ]{" optional: true" if optional else ""} }}'

    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        f"input [\n" + ",\n".join(tensor(*i) for i in inputs) + "\n]\n"
        "output [\n" + ",\n".join(tensor(*o) for o in outputs) + "\n]\n"
        f"instance_group [ {{ count: 1 kind: {kind} }} ]\n{extra}"
    )


def write_models(root: Path, gpu: bool) -> None:
    flags = [("N", "TYPE_INT64", False), ("ON_GPU", "TYPE_INT32", False), ("BF16", "TYPE_INT32", False)]
    xs = [("X_FP32", "TYPE_FP32"), ("X_BF16", "TYPE_BF16")]
    keep_gpu_inputs = 'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n'
    models = {
        "source": (SOURCE, config("source", flags, xs + [("NOTE", "TYPE_STRING")], "KIND_GPU" if gpu else "KIND_CPU")),
        "sink": (SINK, config("sink", [(n, t, True) for n, t in xs + [("NOTE", "TYPE_STRING")]], [("SUM", "TYPE_FP64"), ("ON_GPU", "TYPE_INT32")],
                              "KIND_GPU" if gpu else "KIND_CPU", keep_gpu_inputs)),
        "relay": (RELAY, config("relay", flags, [("SUM", "TYPE_FP64"), ("SINK_ON_GPU", "TYPE_INT32"),
                                                  ("RELAYED_ON_GPU", "TYPE_INT32"), ("MS", "TYPE_FP64")], "KIND_CPU")),
    }
    for name, (code, cfg) in models.items():
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "1" / "model.py").write_text(textwrap.dedent(code).lstrip())
        (root / name / "config.pbtxt").write_text(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="+", default=[8.0, 1.0, 3.0], help="tensor sizes, MiB of float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import tritonclient.http as httpclient

    gpu = host_has_gpu()
    root = project_root() / "build" / "bls_relay"
    write_models(root, gpu)
    http_port = free_port()
    server = TritonServer(root, http_port, free_port(), free_port(), backend_dir=project_root() / ".triton" / "backends",
                          log_file=project_root() / "build" / "bls_relay.log")
    variants = [("host", False, False), ("host", False, True)] + ([("gpu", True, False), ("gpu", True, True)] if gpu else [])
    rows = []
    with server:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        for mib in args.mib:
            n = int(mib * 2**20 / 4)
            expected = float(np.remainder(np.arange(n, dtype=np.float64), 7.0).sum())
            for memory, on_gpu, bf16 in variants:
                inputs = []
                for name, value in (("N", np.array([n], np.int64)), ("ON_GPU", np.array([int(on_gpu)], np.int32)),
                                    ("BF16", np.array([int(bf16)], np.int32))):
                    tensor = httpclient.InferInput(name, [1], "INT64" if name == "N" else "INT32")
                    tensor.set_data_from_numpy(value)
                    inputs.append(tensor)
                samples, where = [], None
                for i in range(args.repeats + 1):
                    result = client.infer("relay", inputs)
                    total = float(result.as_numpy("SUM")[0])
                    if total != expected:
                        raise SystemExit(f"{memory} bf16={bf16} {mib} MiB: sum {total} != {expected}")
                    where = (int(result.as_numpy("RELAYED_ON_GPU")[0]), int(result.as_numpy("SINK_ON_GPU")[0]))
                    if i:
                        samples.append(result.as_numpy("MS"))
                source_ms = statistics.median(float(s[0]) for s in samples)
                sink_ms = statistics.median(float(s[1]) for s in samples)
                rows.append((mib, memory, "bf16" if bf16 else "fp32", n * (2 if bf16 else 4) / 2**20, source_ms, sink_ms, where))
                print(rows[-1], flush=True)

    lines = [
        "# One BLS hop per tensor: dtype and memory",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
        + (f", GPU: {gpu_name()}" if gpu else ", no GPU"),
        f"Command: `python -m bench.bls_relay --mib {' '.join(f'{m:g}' for m in args.mib)} --repeats {args.repeats}`",
        "",
        "`source` ms: the orchestrator's BLS call that brings the tensor back; `sink` ms: the call that hands it on",
        "(medians; both include the tiny model work: making, and summing, the tensor).",
        "",
        "| float32-equivalent MiB | memory | dtype | bytes relayed (MiB) | source ms | sink ms | relayed on GPU, sink on GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for mib, memory, dtype, relayed, source_ms, sink_ms, where in rows:
        lines.append(f"| {mib:g} | {memory} | {dtype} | {relayed:g} | {source_ms:.2f} | {sink_ms:.2f} | {where[0]}, {where[1]} |")
    emit(lines, args.out)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


if __name__ == "__main__":
    main()
