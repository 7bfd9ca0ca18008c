"""Experiment (issue 3): an FA3-structured bf16 attention forward for Hopper in Gluon, Triton's lower-level
dialect, where warp groups, mbarriers and asynchronous wgmma are explicit. Not wired into the library: it
joins the attention registry only if a GPU run shows it correct and faster than the Triton-lang kernel.

Structure (one CTA per 128 query rows of one (batch, head)):
* a 1-warp load partition streams K and V tiles into a ring of ``STAGES`` shared-memory buffers with TMA,
  each buffer guarded by a ready and an empty mbarrier;
* two warp groups (64 query rows each) run the online softmax, software-pipelined as in FA3: S_j = Q·K_jᵀ is
  issued, then O += P_{j-1}·V_{j-1}, and the softmax of S_j runs while that second wgmma is still in flight.
  P stays in registers (wgmma's A operand). ``consumers=1``: both warp groups form the 8-warp default
  partition and sync before handing a buffer back; ``consumers=2``: each warp group is its own partition and
  hands buffers back on its own (count-2 mbarriers), so the two drift apart and overlap each other's softmax
  and wgmma, as FA3's ping-pong intends (without its explicit ordering).

Limits of this version: contiguous ``[B, H, S, D]`` bf16/fp16, head_dim 64 or 128, ``kv_len`` as an int.
Odd lengths are handled: K/V rows past ``kv_len`` are masked to -inf in the last tile, and query rows past
``seq_q`` are not stored.

    python bench/gluon_attention.py --compile-only      # ahead-of-time sm_90 compile (no GPU needed)
    python bench/gluon_attention.py --out gluon.md      # GPU: each layout in its own process (a hang or a bad
                                                        # address costs only that layout): correctness vs
                                                        # float32 on odd shapes, then time vs cuDNN
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCK_M = 128
BLOCK_N = 128
# (BLOCK_N, STAGES) tried per layout: 128-wide S tiles need more registers than the 168 a 3-warp-group CTA
# gets at launch (ptxas spills); 64-wide ones fit, with deeper K/V rings.
LAYOUT_TILES = ((128, 2), (64, 3), (64, 4))


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    q_row, kv_row, num_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for j in range(num_tiles):
        stage = j % STAGES
        free_phase = ((j // STAGES) & 1) ^ 1  # the first pass over the ring finds every buffer free
        mbarrier.wait(k_empty.index(stage), free_phase)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), free_phase)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _softmax_update(s, m_i, l_i, qk_scale, col_start, kv_end, MASK: gl.constexpr, BLOCK_N: gl.constexpr,
                    col_layout: gl.constexpr):
    # Online softmax in log2 units: returns p (float32), the new row max and sum, and the rescale factor.
    if MASK:
        cols = col_start + gl.arange(0, BLOCK_N, layout=col_layout)
        s = gl.where(gl.expand_dims(cols < kv_end, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_new, alpha


@gluon.jit
def _compute_partition(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                       out_ptr, lse_ptr, stride_om, out_offset, lse_offset, q_start, seq_q, kv_end, num_tiles,
                       qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       STAGES: gl.constexpr, RETURN_LSE: gl.constexpr, WARPS: gl.constexpr):
    # BLOCK_M query rows (this partition's) on WARPS warps: 8 = two warp groups in one partition, which must
    # sync before handing a buffer back; 4 = one warp group, its own partition (FA3's layout).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    dtype: gl.constexpr = q_smem.dtype

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, row_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_init = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)

    # Tile 0: S_0 and its softmax; P_0 waits for the next iteration's second wgmma.
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    if WARPS > 4:
        gl.thread_barrier()  # both warp groups are done with K_0 before the buffer is handed back
    mbarrier.arrive(k_empty.index(0), count=1)
    if BLOCK_N > kv_end:
        p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, 0, kv_end, True, BLOCK_N, col_s)
    else:
        p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, 0, kv_end, False, BLOCK_N, col_s)

    for j in range(1, num_tiles):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_ready.index(stage), (j // STAGES) & 1)
        # use_acc=False ignores the accumulator's value: passing the spent S_{j-1} reuses its registers instead
        # of keeping a zero tile alive across the loop
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # S_j is ready; P_{j-1}·V_{j-1} may still run
        if (j + 1) * BLOCK_N > kv_end:
            p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, j * BLOCK_N, kv_end, True, BLOCK_N, col_s)
        else:
            p, m_i, l_i, alpha = _softmax_update(s, m_i, l_i, qk_scale, j * BLOCK_N, kv_end, False, BLOCK_N, col_s)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        if WARPS > 4:
            gl.thread_barrier()
        mbarrier.arrive(k_empty.index(stage), count=1)
        mbarrier.arrive(v_empty.index(prev), count=1)

    last = (num_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((num_tiles - 1) // STAGES) & 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))

    l_o = gl.convert_layout(l_i, row_o)
    out = acc / gl.expand_dims(l_o, 1)
    rows = q_start + gl.arange(0, BLOCK_M, layout=row_o)
    cols = gl.arange(0, HEAD_DIM, layout=col_o)
    offs = out_offset + gl.expand_dims(rows, 1).to(gl.int64) * stride_om + gl.expand_dims(cols, 0)
    gl.store(out_ptr + offs, out.to(dtype), mask=gl.expand_dims(rows < seq_q, 1))
    if RETURN_LSE:
        lse = (gl.convert_layout(m_i, row_o) + gl.log2(l_o)) * 0.6931471805599453
        gl.store(lse_ptr + lse_offset + rows, lse, mask=rows < seq_q)


@gluon.jit
def _attn_fwd_ws(q_desc, k_desc, v_desc, out_ptr, lse_ptr, stride_om, seq_q, seq_kv, kv_end, qk_scale,
                 HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, RETURN_LSE: gl.constexpr, CONSUMERS: gl.constexpr):
    # CONSUMERS 1: the default partition (8 warps) computes all BLOCK_M rows. 2: the default partition and a
    # 4-warp worker each compute half of the rows and each hand buffers back on their own (count-2 barriers).
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    ROWS: gl.constexpr = BLOCK_M // CONSUMERS
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_start = pid_m * BLOCK_M
    num_tiles = gl.cdiv(kv_end, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)  # every consumer hands the buffer back
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)

    out_offset = bh.to(gl.int64) * seq_q * stride_om
    lse_offset = bh.to(gl.int64) * seq_q
    q_row = bh * seq_q + q_start
    kv_row = bh * seq_kv
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_compute_partition, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out_ptr,
                                  lse_ptr, stride_om, out_offset, lse_offset, q_start, seq_q, kv_end, num_tiles,
                                  qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, RETURN_LSE, 8)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                               v_empty, q_row, kv_row, num_tiles, BLOCK_N, STAGES)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (_compute_partition, (q_smem.slice(0, ROWS), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                                  out_ptr, lse_ptr, stride_om, out_offset, lse_offset, q_start, seq_q, kv_end,
                                  num_tiles, qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, RETURN_LSE, 4)),
            (_compute_partition, (q_smem.slice(ROWS, ROWS), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                                  v_empty, out_ptr, lse_ptr, stride_om, out_offset, lse_offset, q_start + ROWS, seq_q,
                                  kv_end, num_tiles, qk_scale, ROWS, BLOCK_N, HEAD_DIM, STAGES, RETURN_LSE, 4)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                               v_empty, q_row, kv_row, num_tiles, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])


def _descriptors(q, k, v, block_m: int, block_n: int):
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    gl_dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, head_dim], gl_dtype)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl_dtype)
    # Flattened rows: a tile that runs past its head reads the next head's rows (or TMA's zero fill at the
    # end); those keys are masked and those query rows are not stored.
    q_desc = TensorDescriptor.from_tensor(q.reshape(batch * heads * seq_q, head_dim), [block_m, head_dim], q_layout)
    k_desc = TensorDescriptor.from_tensor(k.reshape(batch * heads * seq_kv, head_dim), [block_n, head_dim], kv_layout)
    v_desc = TensorDescriptor.from_tensor(v.reshape(batch * heads * seq_kv, head_dim), [block_n, head_dim], kv_layout)
    return q_desc, k_desc, v_desc


def gluon_attention(q, k, v, *, kv_len: int | None = None, return_lse: bool = False, stages: int = 2,
                    consumers: int = 2, block_n: int = BLOCK_N, out: torch.Tensor | None = None):
    """Non-causal attention forward, contiguous ``[B, H, S, D]`` bf16/fp16, head_dim 64/128 (see the docstring)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    if q.dtype not in (torch.bfloat16, torch.float16) or head_dim not in (64, 128):
        raise ValueError(f"gluon_attention: bf16/fp16 with head_dim 64 or 128, got {q.dtype}, {head_dim}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    kv_end = seq_kv if kv_len is None else min(int(kv_len), seq_kv)
    if kv_end <= 0:
        raise ValueError("gluon_attention: kv_len must leave at least one key")
    if out is None or not out.is_contiguous():
        out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq_q if return_lse else 1), device=q.device, dtype=torch.float32)
    q_desc, k_desc, v_desc = _descriptors(q, k, v, BLOCK_M, block_n)
    grid = (triton.cdiv(seq_q, BLOCK_M), batch * heads)
    _attn_fwd_ws[grid](q_desc, k_desc, v_desc, out, lse, out.stride(2), seq_q, seq_kv, kv_end,
                       (1.0 / math.sqrt(head_dim)) * 1.4426950408889634,
                       HEAD_DIM=head_dim, STAGES=stages, RETURN_LSE=return_lse, CONSUMERS=consumers,
                       num_warps=8 if consumers == 1 else 4)
    return (out, lse) if return_lse else out


def _ptxas_spills(ptx: str) -> str:
    """ptxas -v's register and spill line for sm_90a (the bundled ptxas; no GPU needed)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(90).path, "--gpu-name", "sm_90a", "-v", str(src), "-o", str(src.with_suffix(".cubin"))],
                              capture_output=True, text=True)
    info = [line.strip() for line in done.stderr.splitlines() if "spill" in line or "registers" in line]
    return " / ".join(info) or done.stderr.strip()[-200:]


def compile_only(stages: int, head_dim: int, consumers: int, block_n: int) -> None:
    """Ahead-of-time compile for sm_90 on any machine: the kernel type-checks, lowers and assembles."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    q = torch.empty(1, 2, 300, head_dim, dtype=torch.bfloat16)
    q_desc, k_desc, v_desc = _descriptors(q, q, q, BLOCK_M, block_n)
    signature = {"q_desc": mangle_type(q_desc), "k_desc": mangle_type(k_desc), "v_desc": mangle_type(v_desc),
                 "out_ptr": "*bf16", "lse_ptr": "*fp32", "stride_om": "i32", "seq_q": "i32", "seq_kv": "i32",
                 "kv_end": "i32", "qk_scale": "fp32", "HEAD_DIM": "constexpr", "STAGES": "constexpr",
                 "RETURN_LSE": "constexpr", "CONSUMERS": "constexpr"}
    # As the runtime would specialise them: 16-byte-aligned pointers and a row stride divisible by 16.
    aligned = {(list(signature).index(name),): [["tt.divisibility", 16]] for name in ("out_ptr", "lse_ptr", "stride_om")}
    src = GluonASTSource(fn=_attn_fwd_ws, signature=signature, attrs=aligned,
                         constexprs={"HEAD_DIM": head_dim, "STAGES": stages, "RETURN_LSE": True, "CONSUMERS": consumers})
    started = time.time()
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8 if consumers == 1 else 4})
    ptx = kernel.asm["ptx"]
    spills = _ptxas_spills(ptx)
    print(f"consumers={consumers} head_dim={head_dim} block_n={block_n} stages={stages}: {spills}; compiled for sm_90 in {time.time() - started:.1f} s: shared {kernel.metadata.shared} B, "
          f"wgmma {ptx.count('wgmma.mma_async')}, setmaxnreg {ptx.count('setmaxnreg')}, "
          f"cp.async.bulk.tensor {ptx.count('cp.async.bulk.tensor')}")


def measure(consumers: int, stages: int, block_n: int) -> list[str]:
    """One layout in this process: correctness on odd shapes (NaN-poisoned output), then, if every check
    passes, time against cuDNN and the library kernel measured in the same process."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from smart_diffusion_backend.kernels.flash_attention import flash_attention

    lines = [f"## {consumers} consumer partition(s), BLOCK_N {block_n}, {stages} stages", "",
             "| check [B, H, Sq, Skv, kv_len, D] | rel-L2 vs float32 | lse max err | ok |", "|---|---|---|---|"]
    torch.manual_seed(0)
    ok_all = True
    for b, h, s, skv, kv_len, d in [(1, 2, 77, 77, None, 64), (1, 4, 1531, 1531, None, 128),
                                    (2, 3, 1000, 1000, 900, 128), (1, 8, 4608, 512, None, 128),
                                    (1, 24, 4608, 4608, None, 128)]:
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, h, skv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out = torch.full_like(q, float("nan"))  # every element must be written
        out, lse = gluon_attention(q, k, v, kv_len=kv_len, return_lse=True, stages=stages, consumers=consumers,
                                   block_n=block_n, out=out)
        kk, vv = (k, v) if kv_len is None else (k[:, :, :kv_len], v[:, :, :kv_len])
        scores = q.float() @ kk.float().transpose(-1, -2) / math.sqrt(d)
        ref = torch.softmax(scores, -1) @ vv.float()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        lse_err = (lse - torch.logsumexp(scores, -1)).abs().max().item()
        ok = err <= 1e-2 and lse_err <= 1e-2
        ok_all &= ok
        lines.append(f"| {[b, h, s, skv, kv_len, d]} | {err:.2e} | {lse_err:.1e} | {'yes' if ok else 'NO'} |")
        print(lines[-1], flush=True)
    if not ok_all:
        return lines + ["", "Not timed: a check failed.", ""]
    lines += ["", "| S | H | impl | ms | TFLOP/s | × cuDNN |", "|---|---|---|---|---|---|"]
    for s, h in [(4608, 24), (16384, 24), (32760, 40), (75600, 40)]:
        q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        rep = 100 if s < 30000 else 400
        base = do_bench(cudnn, rep=rep)
        for name, fn in [("cudnn", cudnn), ("lib", lambda: flash_attention(q, k, v, out=out)),
                         ("gluon", lambda: gluon_attention(q, k, v, stages=stages, consumers=consumers,
                                                           block_n=block_n, out=out))]:
            ms = base if name == "cudnn" else do_bench(fn, rep=rep)
            lines.append(f"| {s} | {h} | {name} | {ms:.3f} | {4 * h * s * s * 128 / ms / 1e9:.0f} | {base / ms:.3f} |")
            print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiles", nargs="+", default=[f"{n}x{st}" for n, st in LAYOUT_TILES],
                        help="BLOCK_NxSTAGES per layout, e.g. 128x2 64x3")
    parser.add_argument("--child", action="store_true", help="measure one layout in this process (internal)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per layout before it counts as hung")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.compile_only:
        for consumers in args.consumers:
            for block_n, stages in LAYOUT_TILES:
                compile_only(stages, 128, consumers, block_n)
            compile_only(2, 64, consumers, 128)
        return
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
    if args.child:
        block_n, stages = tiles[0]
        print("\n".join(["<<<"] + measure(args.consumers[0], stages, block_n) + [">>>"]), flush=True)
        return
    # Each layout in its own process: an mbarrier mistake hangs the GPU and a bad address poisons the CUDA
    # context, and neither should cost the other layout its result.
    import subprocess

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = ["# Gluon FA3-style attention (bench/gluon_attention.py)", "",
             f"- card: {card} · torch {torch.__version__} · triton {triton.__version__}",
             f"- command: `python {' '.join(sys.argv)}`", ""]
    for consumers, (block_n, stages) in [(c, t) for c in args.consumers for t in tiles]:
        command = [sys.executable, __file__, "--child", "--consumers", str(consumers), "--tiles", f"{block_n}x{stages}"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            text = done.stdout
            if "<<<" in text and ">>>" in text:
                lines += text.split("<<<", 1)[1].split(">>>", 1)[0].strip("\n").splitlines() + [""]
            else:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                lines += [f"## {consumers} consumer partition(s), {block_n}x{stages}: failed (exit {done.returncode})",
                          "", *tail, ""]
        except subprocess.TimeoutExpired:
            lines += [f"## {consumers} consumer partition(s), {block_n}x{stages}: no result within "
                      f"{args.timeout:.0f} s (hung)", ""]
        print("\n".join(lines), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
