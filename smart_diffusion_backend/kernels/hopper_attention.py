"""Attention forward for Hopper (sm_90) in Gluon, Triton's explicit dialect: the FA3 structure.

``flash_attention`` (attention.py) sends bf16/fp16 calls here on an sm_90 GPU when ``hopper_supports`` says the
call fits; everything else runs the portable Triton-lang kernel (flash_attention.py). The contract is the same.

Why Gluon: Triton-lang's own warp specialisation leaves the attention loop unpartitioned on Hopper, and the
portable kernel stays below cuDNN. Written out explicitly, the FA3 layout reaches cuDNN's speed and passes it on
long sequences. Measurements, and the variants tried and left out: docs/attention.md and bench/results/.

Structure: one CTA per 128 query rows of one (batch, head), three partitions.
* A 1-warp load partition streams Q, then K and V tiles, into a 2-stage shared-memory ring with TMA.
  Each buffer has a ready and an empty mbarrier.
* Two 4-warp consumer partitions take 64 query rows each. Each runs its own online softmax and hands
  buffers back on its own (count-2 empty barriers; K as soon as its Q.K^T is read, V after its P.V), so the
  two drift apart and one's softmax overlaps the other's wgmma. Within a partition the loop is
  software-pipelined as in FA3: S_j = Q.K_j^T is issued, then O += P_{j-1}.V_{j-1}, and the softmax of S_j runs
  while that second wgmma is still in flight. P stays in registers (wgmma's A operand).
* O is moved to a layout of 8 consecutive elements per thread before it is stored: from the wgmma layout, each
  store would fill only half a 32-byte sector.

Persistent launch (``PERSISTENT``): at most one CTA per SM, each walking query tiles, with Q in two buffers: the
next tile's Q loads while this one runs, and its S_0 = Q.K_0^T is issued before this tile's last P.V, its softmax
running under that P.V. The other launch is one CTA per query tile. ``persistent_pays`` picks: the persistent
one unless one head's K and V take more than a third of the L2, where its CTAs' drift across heads costs DRAM
traffic.

``QK_INT8`` switches Q.K^T to int8 wgmma on SageAttention-1 inputs (``common.quantize_qk``: per-64-row scales,
K smoothed by its mean), with P.V in V's dtype: ``hopper_int8_attention``, the ``int8`` precision of
``flash_attention`` on sm_90, more accurate than e4m3. The scores become float by bit arithmetic (``_scores``),
since one int->float conversion per score shares exp2's 16-per-clock unit and would make the loop as slow as
bf16's; the K scales are two scalar loads issued ahead of the scores.

Addressing: Q, K and V are read through 2-D TMA descriptors, so each may be in either of the two layouts
DiT attention produces without a copy:
* "heads outer", ``[B, H, S, D]`` contiguous: rows ``(b*H + h)*S + s`` of a ``[B*H*S, D]`` view;
* "heads inner", a ``[B, S, H, D]`` tensor seen through ``.transpose(1, 2)`` (what diffusers' processors
  pass): rows ``b*S + s`` of a ``[B*S, H*D]`` view, columns ``h*D ...``.
Other strides fall back to a copy. A K/V tile that runs past its head reads neighbouring rows (or TMA's
zero fill at the end of the tensor); those keys are masked to -inf, so their probabilities are exactly 0.
Keys and values past ``kv_len`` must hold finite numbers (0 x NaN is NaN in the P.V product); the
sequence-parallel padding is finite by construction. Query rows past ``seq_q`` are never stored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

from smart_diffusion_backend.kernels.common import LOG2E, quantize_qk

__all__ = ["hopper_attention", "hopper_int8_attention", "hopper_supports", "persistent_pays", "HOPPER_HEAD_DIMS"]

HOPPER_HEAD_DIMS = (64, 128)
# int32 -> float32 by bit arithmetic in _scores (QK_INT8): 0x4B400000 is float32 1.5 * 2^23 = 12582912.0, whose
# last mantissa bit is worth 1.0; exact for |s| < 2^22. The kernel spells both numbers out (Gluon constants).
_INT_TO_FLOAT_BITS = 0x4B400000
_INT_TO_FLOAT_VALUE = 12582912.0
BLOCK_M = 128  # query rows per CTA: 64 per consumer partition
BLOCK_N = 128  # keys per tile
STAGES = 2  # K/V ring depth: 2 x 32 KiB Q + 2 x 64 KiB K/V per persistent CTA at head_dim 128


@constexpr_function
def _scores_layout(block_n, qk_int8):
    # S = Q.K^T of one 4-warp consumer partition (64 rows); int8 wgmma takes K=32 per instruction
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, block_n, 32 if qk_int8 else 16])


@constexpr_function
def _accumulator_layout(head_dim):
    # O of one consumer partition, accumulated by the P.V wgmma
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, head_dim, 16])


@gluon.jit
def _load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, k_row, k_col, v_row, v_col,
                   num_tiles, kv_it, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    # K and V tiles of one query tile into the ring; kv_it counts the ring's tiles before it (persistent CTAs).
    for j in range(num_tiles):
        it = kv_it + j
        stage = it % STAGES
        free_phase = ((it // STAGES) & 1) ^ 1  # the first pass over the ring finds every buffer free
        mbarrier.wait(k_empty.index(stage), free_phase)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [k_row + j * BLOCK_N, k_col], k_ready.index(stage),
                                        k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), free_phase)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [v_row + j * BLOCK_N, v_col], v_ready.index(stage),
                                        v_smem.index(stage))


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                    q_row, q_col, k_row, k_col, v_row, v_col, num_tiles, BLOCK_N: gl.constexpr,
                    STAGES: gl.constexpr):
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_bar, q_smem)
    _load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, k_row, k_col, v_row, v_col,
                   num_tiles, 0, BLOCK_N, STAGES)


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
def _softmax_of_tile(scores, m_i, l_i, qk_scale, col_start, kv_end, BLOCK_N: gl.constexpr):
    # _softmax_update with the key mask only on a tile that runs past kv_end
    col_layout: gl.constexpr = gl.SliceLayout(0, scores.type.layout)
    if col_start + BLOCK_N > kv_end:
        p, m_new, l_new, alpha = _softmax_update(scores, m_i, l_i, qk_scale, col_start, kv_end, True, BLOCK_N,
                                                 col_layout)
    else:
        p, m_new, l_new, alpha = _softmax_update(scores, m_i, l_i, qk_scale, col_start, kv_end, False, BLOCK_N,
                                                 col_layout)
    return p, m_new, l_new, alpha


@gluon.jit
def _q_scale(q_scale_ptr, q_scale_offset, q_start, QK_INT8: gl.constexpr):
    # QK_INT8: the one scale of this partition's 64 query rows (quantize_qk's blocks are 64 rows)
    scale = 1.0
    if QK_INT8:
        scale = gl.load(q_scale_ptr + q_scale_offset + q_start // 64)
    return scale


@gluon.jit
def _score_scale(k_scale_ptr, k_scale_offset, col_start, q_scale, BLOCK_N: gl.constexpr, col_layout: gl.constexpr,
                 QK_INT8: gl.constexpr):
    # QK_INT8: Q's scale times the per-64-key scales of the K tile at col_start (BLOCK_N = 128: two of them), per
    # column. Two scalar loads, issued before the scores are waited for, so no load sits on the softmax's path.
    scale = 1.0
    if QK_INT8:
        first = gl.load(k_scale_ptr + k_scale_offset + col_start // 64) * q_scale
        second = gl.load(k_scale_ptr + k_scale_offset + col_start // 64 + 1) * q_scale
        cols = gl.arange(0, BLOCK_N, layout=col_layout)
        scale = gl.where(cols < 64, first, second)
    return scale


@gluon.jit
def _scores(s, scale, QK_INT8: gl.constexpr):
    # QK_INT8: int32 Q8.K8^T -> float32 scores times _score_scale's per-column scale.
    # Not with cvt: the conversion (SASS I2FP) issues at 16 per clock per SM on the same unit as exp2, and one
    # per score beside the softmax's exp2 makes that unit as slow as the tensor cores. |Q8.K8^T| <= 128 * 128 *
    # HEAD_DIM < 2^22, so adding the bit pattern of 1.5 * 2^23 (_INT_TO_FLOAT_BITS) gives a float32 equal to
    # 1.5 * 2^23 + s exactly; subtracting 1.5 * 2^23 leaves s: an integer add and a float subtract, which issue
    # at 64 and 128 per clock.
    scores = s
    if QK_INT8:
        exact = (s + 1262485504).to(gl.float32, bitcast=True) - 12582912.0
        scores = exact * gl.expand_dims(scale, 0)
    return scores


@gluon.jit
def _first_softmax(s, scale, qk_scale, kv_end, BLOCK_N: gl.constexpr, QK_INT8: gl.constexpr):
    # The softmax of a query tile's first K/V tile (S_0 = s), from an empty state.
    row_s: gl.constexpr = gl.SliceLayout(1, s.type.layout)
    m_i = gl.full([s.shape[0]], float("-inf"), gl.float32, row_s)
    l_i = gl.full([s.shape[0]], 0.0, gl.float32, row_s)
    return _softmax_of_tile(_scores(s, scale, QK_INT8), m_i, l_i, qk_scale, 0, kv_end, BLOCK_N)


@gluon.jit
def _first_tile(q_smem, k_smem, k_ready, k_empty, it, scale, s, kv_end, qk_scale, BLOCK_N: gl.constexpr,
                STAGES: gl.constexpr, QK_INT8: gl.constexpr):
    # S_0 = Q.K_0^T of a query tile (ring position it) and its softmax from an empty state; s: registers to reuse.
    stage = it % STAGES
    mbarrier.wait(k_ready.index(stage), (it // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    mbarrier.arrive(k_empty.index(stage), count=1)
    p, m_i, l_i, alpha = _first_softmax(s, scale, qk_scale, kv_end, BLOCK_N, QK_INT8)
    return s, p, m_i, l_i, alpha


@gluon.jit
def _kv_loop(q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, k_scale_ptr, k_scale_offset, q_scale, s, p,
             alpha, m_i, l_i, acc, kv_it, num_tiles, kv_end, qk_scale, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             QK_INT8: gl.constexpr):
    # K/V tiles 1 .. num_tiles-1 of one query tile (tile 0's softmax done), software-pipelined as in FA3: S_j is
    # issued, then O += P_{j-1}.V_{j-1}, and S_j's softmax runs while that second wgmma is in flight. Stops before
    # the last P.V. QK_INT8: Q and K are int8 with per-64-row scales (SageAttention 1); P.V stays in V's dtype.
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    col_s: gl.constexpr = gl.SliceLayout(0, s.type.layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = v_smem.dtype
    for j in range(1, num_tiles):
        stage = (kv_it + j) % STAGES
        prev = (kv_it + j - 1) % STAGES
        scale = _score_scale(k_scale_ptr, k_scale_offset, j * BLOCK_N, q_scale, BLOCK_N, col_s, QK_INT8)
        # O's rescale and P's conversion need neither buffer: done before the waits, the two wgmmas issue back to back
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(k_ready.index(stage), ((kv_it + j) // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((kv_it + j - 1) // STAGES) & 1)
        # use_acc=False ignores the accumulator's value: passing the spent S_{j-1} reuses its registers instead
        # of keeping a zero tile alive across the loop
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))  # S_j is ready; P_{j-1}.V_{j-1} may still run
        mbarrier.arrive(k_empty.index(stage), count=1)  # K_j is read: the loader may refill it during the softmax
        p, m_i, l_i, alpha = _softmax_of_tile(_scores(s, scale, QK_INT8), m_i, l_i, qk_scale, j * BLOCK_N, kv_end,
                                              BLOCK_N)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(prev), count=1)
    return acc, s, p, alpha, m_i, l_i


@gluon.jit
def _store_rows(acc, m_i, l_i, out_ptr, lse_ptr, stride_os, out_offset, lse_offset, q_start, seq_q,
                ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, RETURN_LSE: gl.constexpr):
    # Normalise and store this partition's rows (and their log-sum-exp). The wgmma layout gives each thread pairs
    # of columns, so stores from it would fill half of each 32-byte sector; the tile is moved to 8 consecutive
    # elements per thread first (16-byte stores, whole rows per warp).
    row_o: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [4, 1], [1, 0])
    l_o = gl.convert_layout(l_i, row_o)
    out = gl.convert_layout((acc / gl.expand_dims(l_o, 1)).to(out_ptr.dtype.element_ty), store_layout)
    rows = q_start + gl.arange(0, ROWS, layout=gl.SliceLayout(1, store_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store_layout))
    offs = out_offset + gl.expand_dims(rows, 1).to(gl.int64) * stride_os + gl.expand_dims(cols, 0)
    gl.store(out_ptr + offs, out, mask=gl.expand_dims(rows < seq_q, 1))
    if RETURN_LSE:
        lse_rows = q_start + gl.arange(0, ROWS, layout=row_o)
        lse = (gl.convert_layout(m_i, row_o) + gl.log2(l_o)) * 0.6931471805599453
        gl.store(lse_ptr + lse_offset + lse_rows, lse, mask=lse_rows < seq_q)


@gluon.jit
def _compute_partition(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                       out_ptr, lse_ptr, stride_os, out_offset, lse_offset, q_start, seq_q, kv_end, num_tiles,
                       qk_scale, q_scale_ptr, k_scale_ptr, q_scale_offset, k_scale_offset, ROWS: gl.constexpr,
                       BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                       RETURN_LSE: gl.constexpr, QK_INT8: gl.constexpr):
    # One query tile per CTA: ROWS of its rows on this warp group.
    s_layout: gl.constexpr = _scores_layout(BLOCK_N, QK_INT8)
    o_layout: gl.constexpr = _accumulator_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    q_scale = _q_scale(q_scale_ptr, q_scale_offset, q_start, QK_INT8)
    scale = _score_scale(k_scale_ptr, k_scale_offset, 0, q_scale, BLOCK_N, col_s, QK_INT8)
    s = gl.zeros([ROWS, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)
    s, p, m_i, l_i, alpha = _first_tile(q_smem, k_smem, k_ready, k_empty, 0, scale, s, kv_end, qk_scale, BLOCK_N,
                                        STAGES, QK_INT8)
    acc, s, p, alpha, m_i, l_i = _kv_loop(q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, k_scale_ptr,
                                          k_scale_offset, q_scale, s, p, alpha, m_i, l_i, acc, 0, num_tiles, kv_end,
                                          qk_scale, BLOCK_N, STAGES, QK_INT8)
    last = (num_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((num_tiles - 1) // STAGES) & 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(v_smem.dtype), p_layout), v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    _store_rows(acc, m_i, l_i, out_ptr, lse_ptr, stride_os, out_offset, lse_offset, q_start, seq_q, ROWS, HEAD_DIM,
                RETURN_LSE)


@gluon.jit
def _load_partition_persistent(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                               v_ready, v_empty, total_tiles, m_tiles, heads, q_rows_b, q_rows_h, q_col_h, k_rows_b,
                               k_rows_h, k_col_h, v_rows_b, v_rows_h, v_col_h, num_tiles, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    # Query tiles pid, pid + G, ...: Q into a 2-buffer ring (tile t's Q loads while tile t-1 runs), K/V into the
    # K/V ring behind the previous tile's, so the consumers can start the next tile before finishing this one.
    kv_it = 0
    t_local = 0
    for tile in range(gl.program_id(0), total_tiles, gl.num_programs(0)):
        bh = tile // m_tiles
        q_start = (tile % m_tiles) * BLOCK_M
        b = bh // heads
        h = bh % heads
        q_buf = t_local % 2
        mbarrier.wait(q_empty.index(q_buf), ((t_local // 2) & 1) ^ 1)
        mbarrier.expect(q_ready.index(q_buf), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b * q_rows_b + h * q_rows_h + q_start, h * q_col_h],
                                        q_ready.index(q_buf), q_smem.index(q_buf))
        _load_kv_tiles(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, b * k_rows_b + h * k_rows_h,
                       h * k_col_h, b * v_rows_b + h * v_rows_h, h * v_col_h, num_tiles, kv_it, BLOCK_N, STAGES)
        kv_it += num_tiles
        t_local += 1


@gluon.jit
def _compute_partition_persistent(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
                                  out_ptr, lse_ptr, stride_ob, stride_oh, stride_os, total_tiles, m_tiles, heads,
                                  seq_q, kv_end, num_tiles, qk_scale, q_scale_ptr, k_scale_ptr, q_scale_rows,
                                  k_scale_rows, ROW_OFFSET: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr,
                                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                                  RETURN_LSE: gl.constexpr, QK_INT8: gl.constexpr):
    # This partition's ROWS of each query tile pid, pid + G, ... The next tile's S_0 is issued before this tile's
    # last P.V and its softmax runs while that P.V is in flight; the store follows. So the tensor cores stay busy
    # across tile boundaries, where both partitions would otherwise wait on the same latencies at once.
    s_layout: gl.constexpr = _scores_layout(BLOCK_N, QK_INT8)
    o_layout: gl.constexpr = _accumulator_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    dtype: gl.constexpr = v_smem.dtype
    step = gl.num_programs(0)

    first = gl.program_id(0)
    bh = first // m_tiles
    q_scale = _q_scale(q_scale_ptr, bh * q_scale_rows, (first % m_tiles) * BLOCK_M + ROW_OFFSET, QK_INT8)
    scale = _score_scale(k_scale_ptr, bh * k_scale_rows, 0, q_scale, BLOCK_N, col_s, QK_INT8)
    s = gl.zeros([ROWS, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)
    mbarrier.wait(q_ready.index(0), 0)
    s, p, m_i, l_i, alpha = _first_tile(q_smem.index(0).slice(ROW_OFFSET, ROWS), k_smem, k_ready, k_empty, 0, scale, s,
                                        kv_end, qk_scale, BLOCK_N, STAGES, QK_INT8)
    kv_it = 0
    t_local = 0
    for tile in range(first, total_tiles, step):
        bh = tile // m_tiles
        q_start = (tile % m_tiles) * BLOCK_M + ROW_OFFSET
        b = bh // heads
        h = bh % heads
        q_buf = t_local % 2
        q_scale = _q_scale(q_scale_ptr, bh * q_scale_rows, q_start, QK_INT8)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        acc, s, p, alpha, m_i, l_i = _kv_loop(q_smem.index(q_buf).slice(ROW_OFFSET, ROWS), k_smem, v_smem, k_ready,
                                              k_empty, v_ready, v_empty, k_scale_ptr, bh * k_scale_rows, q_scale, s,
                                              p, alpha, m_i, l_i, acc, kv_it, num_tiles, kv_end, qk_scale, BLOCK_N,
                                              STAGES, QK_INT8)
        mbarrier.arrive(q_empty.index(q_buf), count=1)  # every Q.K^T of this tile is done: its Q may be replaced

        last_it = kv_it + num_tiles - 1
        last = last_it % STAGES
        mbarrier.wait(v_ready.index(last), (last_it // STAGES) & 1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        next_tile = tile + step
        if next_tile < total_tiles:
            next_bh = next_tile // m_tiles
            next_q_scale = _q_scale(q_scale_ptr, next_bh * q_scale_rows, (next_tile % m_tiles) * BLOCK_M + ROW_OFFSET,
                                    QK_INT8)
            next_scale = _score_scale(k_scale_ptr, next_bh * k_scale_rows, 0, next_q_scale, BLOCK_N, col_s, QK_INT8)
            next_it = last_it + 1
            next_stage = next_it % STAGES
            next_buf = (t_local + 1) % 2
            mbarrier.wait(q_ready.index(next_buf), ((t_local + 1) // 2) & 1)
            mbarrier.wait(k_ready.index(next_stage), (next_it // STAGES) & 1)
            s = warpgroup_mma(q_smem.index(next_buf).slice(ROW_OFFSET, ROWS), k_smem.index(next_stage).permute((1, 0)),
                              s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))  # the next tile's S_0 is ready; this tile's last P.V may still run
            mbarrier.arrive(k_empty.index(next_stage), count=1)
            p_next, m_next, l_next, alpha_next = _first_softmax(s, next_scale, qk_scale, kv_end, BLOCK_N, QK_INT8)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
        else:
            acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            p_next, m_next, l_next, alpha_next = p, m_i, l_i, alpha
        mbarrier.arrive(v_empty.index(last), count=1)
        _store_rows(acc, m_i, l_i, out_ptr, lse_ptr, stride_os, b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh,
                    bh.to(gl.int64) * seq_q, q_start, seq_q, ROWS, HEAD_DIM, RETURN_LSE)
        p, m_i, l_i, alpha = p_next, m_next, l_next, alpha_next
        kv_it += num_tiles
        t_local += 1


@gluon.jit
def _init_ring_barriers(k_ready, k_empty, v_ready, v_empty, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers hand the buffer back
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)


@gluon.jit
def _attn_fwd_hopper(q_desc, k_desc, v_desc, out_ptr, lse_ptr, stride_ob, stride_oh, stride_os, heads, seq_q,
                     kv_end, qk_scale, q_rows_b, q_rows_h, q_col_h, k_rows_b, k_rows_h, k_col_h,
                     v_rows_b, v_rows_h, v_col_h, q_scale_ptr, k_scale_ptr, q_scale_rows, k_scale_rows, total_tiles,
                     HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, RETURN_LSE: gl.constexpr,
                     QK_INT8: gl.constexpr, PERSISTENT: gl.constexpr):
    # The default partition and a 4-warp worker each compute half of the query rows; a 1-warp worker loads.
    # PERSISTENT: a grid of at most one CTA per SM walks the total_tiles query tiles (query-tile index fastest,
    # then batch x head), see _load_partition_persistent; otherwise the grid is (query tiles, batch x heads).
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    ROWS: gl.constexpr = BLOCK_M // 2
    num_tiles = gl.cdiv(kv_end, BLOCK_N)

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    _init_ring_barriers(k_ready, k_empty, v_ready, v_empty, STAGES)

    if PERSISTENT:
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)
        m_tiles = gl.cdiv(seq_q, BLOCK_M)
        gl.warp_specialize([
            (_compute_partition_persistent, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                                             v_empty, out_ptr, lse_ptr, stride_ob, stride_oh, stride_os, total_tiles,
                                             m_tiles, heads, seq_q, kv_end, num_tiles, qk_scale, q_scale_ptr,
                                             k_scale_ptr, q_scale_rows, k_scale_rows, 0, BLOCK_M, ROWS, BLOCK_N,
                                             HEAD_DIM, STAGES, RETURN_LSE, QK_INT8)),
            (_compute_partition_persistent, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready,
                                             v_empty, out_ptr, lse_ptr, stride_ob, stride_oh, stride_os, total_tiles,
                                             m_tiles, heads, seq_q, kv_end, num_tiles, qk_scale, q_scale_ptr,
                                             k_scale_ptr, q_scale_rows, k_scale_rows, ROWS, BLOCK_M, ROWS, BLOCK_N,
                                             HEAD_DIM, STAGES, RETURN_LSE, QK_INT8)),
            (_load_partition_persistent, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                                          k_empty, v_ready, v_empty, total_tiles, m_tiles, heads, q_rows_b, q_rows_h,
                                          q_col_h, k_rows_b, k_rows_h, k_col_h, v_rows_b, v_rows_h, v_col_h,
                                          num_tiles, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])
    else:
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // heads
        h = bh % heads
        q_start = pid_m * BLOCK_M
        out_offset = b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        lse_offset = bh.to(gl.int64) * seq_q
        q_row = b * q_rows_b + h * q_rows_h + q_start
        q_col = h * q_col_h
        k_row = b * k_rows_b + h * k_rows_h
        k_col = h * k_col_h
        v_row = b * v_rows_b + h * v_rows_h
        v_col = h * v_col_h
        q_scale_offset = bh * q_scale_rows  # QK_INT8: scales are [B*H, S_pad/64]
        k_scale_offset = bh * k_scale_rows
        gl.warp_specialize([
            (_compute_partition, (q_smem.slice(0, ROWS), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                                  out_ptr, lse_ptr, stride_os, out_offset, lse_offset, q_start, seq_q, kv_end,
                                  num_tiles, qk_scale, q_scale_ptr, k_scale_ptr, q_scale_offset, k_scale_offset,
                                  ROWS, BLOCK_N, HEAD_DIM, STAGES, RETURN_LSE, QK_INT8)),
            (_compute_partition, (q_smem.slice(ROWS, ROWS), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                                  v_empty, out_ptr, lse_ptr, stride_os, out_offset, lse_offset, q_start + ROWS, seq_q,
                                  kv_end, num_tiles, qk_scale, q_scale_ptr, k_scale_ptr, q_scale_offset,
                                  k_scale_offset, ROWS, BLOCK_N, HEAD_DIM, STAGES, RETURN_LSE, QK_INT8)),
            (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                               v_empty, q_row, q_col, k_row, k_col, v_row, v_col, num_tiles, BLOCK_N, STAGES)),
        ], [4, 1], [240, 24])


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowView:
    """How a ``[B, H, S, D]`` tensor maps onto the rows and columns of a 2-D TMA view."""

    rows: int  # rows of the 2-D view
    width: int  # its columns
    row_stride: int  # elements between consecutive rows
    rows_per_batch: int
    rows_per_head: int  # 0 when heads are side by side within a row
    cols_per_head: int  # 0 when each head has its own rows


def row_view(t: torch.Tensor) -> RowView | None:
    """The 2-D view a TMA descriptor can read ``t`` through, or None for strides it cannot."""
    batch, heads, seq, head_dim = t.shape
    s_b, s_h, s_s, s_d = t.stride()
    if s_d != 1 or (s_s * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    if s_h == seq * s_s and (batch == 1 or s_b == heads * s_h):  # heads outer
        return RowView(batch * heads * seq, head_dim, s_s, heads * seq, seq, 0)
    if s_h == head_dim and s_s >= heads * head_dim and (batch == 1 or s_b == seq * s_s):  # heads inner
        return RowView(batch * seq, heads * head_dim, s_s, seq, 0, head_dim)
    return None


def readable(t: torch.Tensor) -> tuple[torch.Tensor, RowView]:
    """``t`` with the view TMA reads it through: ``t`` itself, or a contiguous copy where its strides allow none."""
    view = row_view(t)
    if view is None:
        t = t.contiguous()
        view = row_view(t)
    return t, view


@functools.lru_cache(maxsize=None)
def _shared_layout(block_rows: int, head_dim: int, dtype: torch.dtype):
    # Built once per tile shape: constructing it costs ~14 us of Python, three times per attention call.
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.int8: gl.int8}[dtype]
    return gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], gl_dtype)


def _descriptor(t: torch.Tensor, view: RowView, block_rows: int) -> TensorDescriptor:
    head_dim = t.shape[-1]
    flat = t.as_strided((view.rows, view.width), (view.row_stride, 1))
    return TensorDescriptor.from_tensor(flat, [block_rows, head_dim], _shared_layout(block_rows, head_dim, t.dtype))


def hopper_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len) -> bool:
    """Whether this call can take the Hopper kernel: an sm_90 GPU, bf16/fp16, head_dim 64 or 128, an int (or
    no) kv_len above 0 (inputs already validated by ``flash_attention``)."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if q.shape[-1] not in HOPPER_HEAD_DIMS or isinstance(kv_len, torch.Tensor):
        return False
    if kv_len is not None and kv_len <= 0:
        return False  # no key at all: the portable kernel writes 0 and lse -inf
    return _capability(q.device.index or 0) == (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


def persistent_pays(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the persistent launch is the one to take for these keys and values (else one CTA per query tile).

    A persistent CTA walks every G-th query tile (G = its grid), so over a long kernel the CTAs drift apart and
    those running at once read the K/V of more than one head; the grid launch's CTAs are handed out in order by
    the hardware and stay together. Where one head's K and V outgrow the L2, the drift multiplies DRAM traffic
    and the grid launch is faster; on short keys the persistent one is. Hence the persistent launch while one
    head's K and V take at most a third of the L2 (the H100 measurements behind the rule: docs/attention.md)."""
    kv_bytes = k.shape[2] * (k.shape[3] * k.element_size() + v.shape[3] * v.element_size())
    return 3 * kv_bytes <= _l2_bytes(k.device.index or 0)


def hopper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, kv_len: int | None,
                     return_lse: bool, out: torch.Tensor | None = None,
                     persistent: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch on validated inputs (see ``hopper_supports``); returns ``(out, lse)``, lse empty unless asked.
    ``persistent``: True, one CTA per SM walks the query tiles; False, one CTA per query tile; None (the
    default), whichever ``persistent_pays`` says."""
    views = [readable(t) for t in (q, k, v)]
    if persistent is None:
        persistent = persistent_pays(k, v)
    return _launch_into(views, q, k.shape[2], kv_len, out, return_lse, qk_scale=softmax_scale * LOG2E,
                        persistent=persistent)


def hopper_int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                          kv_len: int | None, return_lse: bool, out: torch.Tensor | None = None,
                          persistent: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 Q.K^T, P.V in v's dtype, on inputs ``hopper_supports`` accepts; returns ``(out, lse)`` like
    ``hopper_attention``. Q and K are quantised first (``quantize_qk``), V is read in place. ``persistent`` stays
    on by default: ``persistent_pays`` was derived from bf16 timings, and for int8 neither launch won at every
    length."""
    batch, heads = q.shape[:2]
    q8, q_scale, k8, k_scale, k_mean = quantize_qk(q, k, softmax_scale, kv_len, int8=True)
    # quantize_qk's [B*H, S_pad, D] buffers, seen as heads outer [B, H, S_pad, D]
    q8, k8 = (t.view(batch, heads, t.shape[1], t.shape[2]) for t in (q8, k8))
    out, lse = _launch_into([readable(q8), readable(k8), readable(v)], q, k.shape[2], kv_len, out, return_lse,
                            qk_scale=1.0, qk_scales=(q_scale, k_scale), persistent=persistent)
    if return_lse:  # the kernel's lse is of the smoothed scores: add q.mean(k) back
        lse = lse + torch.einsum("bhsd,bhd->bhs", q.float(), k_mean) * softmax_scale
    return out, lse


def _launch_into(views: list[tuple[torch.Tensor, RowView]], q: torch.Tensor, seq_kv: int, kv_len: int | None,
                 out: torch.Tensor | None, return_lse: bool, **launch_args) -> tuple[torch.Tensor, torch.Tensor]:
    """``launch`` into ``out`` where the kernel can store there (rows of head_dim contiguous elements, 16-byte
    aligned), else into a new tensor laid out like q (copied into ``out`` after, when one was given)."""
    batch, heads, seq_q, _ = q.shape
    kv_end = seq_kv if kv_len is None else min(int(kv_len), seq_kv)

    if out is not None and out.stride(-1) == 1 and out.data_ptr() % 16 == 0:
        target = out
    elif q.stride(-1) == 1:  # a new tensor laid out like q (the allocator's pointers are aligned)
        target = torch.empty_like(q)
    else:  # q itself has head_dim strided
        target = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, seq_q if return_lse else 0), device=q.device, dtype=torch.float32)
    launch(views, target, lse, kv_end=kv_end, return_lse=return_lse, **launch_args)
    if out is not None and out is not target:
        target = out.copy_(target)
    return target, lse


def launch(views: list[tuple[torch.Tensor, RowView]], out: torch.Tensor, lse: torch.Tensor, *, kv_end: int,
           qk_scale: float, return_lse: bool, persistent: bool = True, stages: int = STAGES,
           qk_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One launch of ``_attn_fwd_hopper`` over ``[(q, its RowView), (k, ...), (v, ...)]``; writes ``out`` (rows of
    head_dim contiguous elements) and, with ``return_lse``, ``lse`` ([B, H, seq_q] float32), seq_q being out's.
    ``qk_scales`` (q_scale, k_scale), ``[B*H, S_pad/64]`` each, switch Q.K^T to int8: q and k are then
    ``quantize_qk``'s int8 buffers seen as ``[B, H, S_pad, D]``. ``persistent``: at most one CTA per SM."""
    (q, q_view), (k, k_view), (v, v_view) = views
    batch, heads, seq_q, head_dim = out.shape
    m_tiles = triton.cdiv(seq_q, BLOCK_M)
    grid = (min(m_tiles * batch * heads, _sm_count(out.device.index or 0)), 1) if persistent else (m_tiles,
                                                                                                   batch * heads)
    q_scale, k_scale = qk_scales if qk_scales is not None else (lse, lse)  # unread without QK_INT8
    _attn_fwd_hopper[grid](
        _descriptor(q, q_view, BLOCK_M), _descriptor(k, k_view, BLOCK_N), _descriptor(v, v_view, BLOCK_N),
        out, lse, out.stride(0), out.stride(1), out.stride(2), heads, seq_q, kv_end, qk_scale,
        q_view.rows_per_batch, q_view.rows_per_head, q_view.cols_per_head,
        k_view.rows_per_batch, k_view.rows_per_head, k_view.cols_per_head,
        v_view.rows_per_batch, v_view.rows_per_head, v_view.cols_per_head,
        q_scale, k_scale, q_scale.shape[-1] if qk_scales else 0, k_scale.shape[-1] if qk_scales else 0,
        m_tiles * batch * heads,
        HEAD_DIM=head_dim, STAGES=stages, RETURN_LSE=return_lse, QK_INT8=qk_scales is not None,
        PERSISTENT=persistent, num_warps=4)


def compile_for_sm90(head_dim: int, *, qk_int8: bool = False, stages: int = STAGES, persistent: bool = False) -> dict:
    """Ahead-of-time compile for sm_90 on any machine (no GPU needed): used by the CPU tests and the bench."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    t = torch.empty((1, 2, 384, head_dim), dtype=torch.bfloat16)
    qk = t.to(torch.int8) if qk_int8 else t
    q_desc, k_desc = _descriptor(qk, row_view(qk), BLOCK_M), _descriptor(qk, row_view(qk), BLOCK_N)
    v_desc = _descriptor(t, row_view(t), BLOCK_N)
    names = ["q_desc", "k_desc", "v_desc", "out_ptr", "lse_ptr", "stride_ob", "stride_oh", "stride_os", "heads",
             "seq_q", "kv_end", "qk_scale", "q_rows_b", "q_rows_h", "q_col_h", "k_rows_b",
             "k_rows_h", "k_col_h", "v_rows_b", "v_rows_h", "v_col_h", "q_scale_ptr", "k_scale_ptr",
             "q_scale_rows", "k_scale_rows", "total_tiles", "HEAD_DIM", "STAGES", "RETURN_LSE", "QK_INT8",
             "PERSISTENT"]
    types = [mangle_type(q_desc), mangle_type(k_desc), mangle_type(v_desc), "*bf16", "*fp32"] + ["i32"] * 6 + \
        ["fp32"] + ["i32"] * 9 + ["*fp32", "*fp32", "i32", "i32", "i32"] + ["constexpr"] * 5
    signature = dict(zip(names, types))
    # As the runtime specialises them: 16-byte-aligned pointers, strides divisible by 16.
    aligned = {(names.index(n),): [["tt.divisibility", 16]]
               for n in ("out_ptr", "lse_ptr", "stride_ob", "stride_oh", "stride_os", "q_scale_ptr", "k_scale_ptr")}
    src = GluonASTSource(fn=_attn_fwd_hopper, signature=signature, attrs=aligned,
                         constexprs={"HEAD_DIM": head_dim, "STAGES": stages, "RETURN_LSE": True, "QK_INT8": qk_int8,
                                     "PERSISTENT": persistent})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    report, sass = _assemble(ptx)
    return {"ptx": ptx, "shared_bytes": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "int8_wgmma": ptx.count(".s32.s8.s8"), "tma_loads": ptx.count("cp.async.bulk.tensor"),
            "ptxas": report, "sass": sass}


def _assemble(ptx: str) -> tuple[str, str]:
    """ptxas -v's register and spill lines for sm_90a, and the SASS (nvdisasm), from the ptxas and nvdisasm that
    Triton bundles (no GPU needed)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(90).path)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "attention.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), "--gpu-name", "sm_90a", "-v", str(src), "-o",
                               str(src.with_suffix(".cubin"))], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(ptxas.with_name("nvdisasm")), "-c", str(src.with_suffix(".cubin"))],
                              capture_output=True, text=True, check=True).stdout
    report = " / ".join(line.strip() for line in done.stderr.splitlines() if "spill" in line or "registers" in line)
    return report, sass
