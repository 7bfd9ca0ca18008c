"""Is the compiled transformer less accurate than eager in bf16? Both against a float32 reference.

On GPUs the compiled Wan/Flux forward differs from eager by rel-L2 1.3-1.6e-2 in bf16 with random weights
(bench/results/sp-h100x2.md). This measures, on any device, how far each bf16 path lies from the float32
model on the same weights and inputs: a deep real-architecture stack (40 Wan blocks / 19+38 Flux blocks) at
small widths, so it runs on a CPU in a minute.

    python bench/compile_accuracy.py --model wan --out bench/results/compile-accuracy-cpu.md
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sp_bench  # noqa: E402
from report import emit  # noqa: E402


def build(kind: str) -> tuple[torch.nn.Module, dict]:
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if kind == "wan":
        cfg = dict(sp_bench.WAN14B)
        cfg.update(num_attention_heads=4, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=256)
        model = WanTransformer3DModel(**cfg).eval()  # all 40 blocks
        spec = dict(kind="wan", h=64, w=80, frames=9, tiny=True)
    else:
        model = FluxTransformer2DModel(guidance_embeds=True, patch_size=1, in_channels=64, num_layers=19,
                                       num_single_layers=38, attention_head_dim=32, num_attention_heads=4,
                                       joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12)).eval()
        spec = dict(kind="flux", h=64, w=64, tiny=True)
    return model, sp_bench._inputs(model, spec, torch.device("cpu"), torch.float32)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["wan", "flux"], nargs="+", default=["wan", "flux"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from smart_diffusion_backend.attention.compile import compile_repeated_blocks

    lines = ["# bf16 eager vs bf16 compiled, each against the float32 model (bench/compile_accuracy.py)", "",
             f"- {platform.machine()} CPU, torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
             "- Real block stacks (Wan2.1: 40 blocks; Flux.1: 19 double + 38 single) at small widths, random "
             "weights, one forward; the whole model cast to bf16 (norms included).", "",
             "| model | bf16 eager vs fp32 | bf16 compiled vs fp32 | compiled vs eager | compiled at least as close to fp32 |",
             "|---|---|---|---|---|"]
    for kind in args.model:
        model, inputs = build(kind)
        with torch.inference_mode():
            reference = model(**inputs)[0]
        model = model.to(torch.bfloat16)
        bf16_inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()}
        with torch.inference_mode():
            eager = model(**bf16_inputs)[0]
        compile_repeated_blocks(model, dynamic=None, fullgraph=False)
        with torch.inference_mode():
            compiled = model(**bf16_inputs)[0]
        torch._dynamo.reset()
        err_eager, err_compiled = rel_l2(eager, reference), rel_l2(compiled, reference)
        lines.append(f"| {kind} | {err_eager:.2e} | {err_compiled:.2e} | {rel_l2(compiled, eager):.2e} | "
                     f"{'yes' if err_compiled <= err_eager else 'no'} |")
        print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
