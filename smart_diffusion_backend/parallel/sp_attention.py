"""Sequence-parallel attention: Ulysses, Ring and the hybrid Ulysses x Ring (xDiT usp.py style).

Contract shared with the attention registry and the processors (``smart_diffusion_backend.attention``)::

    attention(q, k, v, *, softmax_scale=None, kv_len=None, return_lse=False) -> out | (out, lse)

``q, k, v``: ``[B, H, S, D]``; ``out``: ``[B, H, S, D]`` in ``q.dtype``; ``lse``: ``[B, H, S]`` float32,
natural-log log-sum-exp of the scaled scores of each query row. ``kv_len``: only keys ``[0, kv_len)`` are
valid (padding lives at the end of the sequence); ``None`` means all keys.

Under sequence parallelism ``S`` is this rank's shard ``S_local`` of the joint sequence and ``kv_len``
counts valid keys of the *global* (padded) joint sequence: chunk ``sp_rank`` covers global positions
``[sp_rank * S_local, (sp_rank + 1) * S_local)`` and the padding sits at the end of the last chunks.

Algorithms (the layout comes from ``parallel_state``):
* Ulysses (degree U): one all-to-all for q/k/v together, ``[B, H, S/U, D] -> [B, H/U, S, D]``, local
  attention over the full sequence for H/U heads, one all-to-all back.
* Ring (degree R): q stays; K/V blocks travel around the ring with batched isend/irecv (the next block
  is in flight while this one is computed); partial outputs are merged with the LSE in float32.
* Hybrid: Ulysses inside each Ulysses group, then Ring across groups over the gathered segments.
* Heads not divisible by U: Ring over the whole SP group instead (never an error).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from . import parallel_state as ps

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionFn",
    "SequenceParallelAttention",
    "resolve_attention_backend",
    "ring_attention",
    "ulysses_all_to_all_qkv",
]


class AttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        softmax_scale: float | None = None,
        kv_len: int | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def resolve_attention_backend(backend: str | AttentionFn) -> AttentionFn:
    """A callable as is, or a name looked up in ``smart_diffusion_backend.attention.registry``."""
    if callable(backend):
        return backend
    if not isinstance(backend, str):
        raise TypeError(f"attention backend must be a name or a callable, got {type(backend).__name__}")
    try:
        from smart_diffusion_backend.attention.registry import get_attention_backend
    except ImportError as e:
        raise RuntimeError(
            f"attention backend {backend!r} requested by name but smart_diffusion_backend.attention.registry "
            f"is not importable ({e}); pass an attention callable instead"
        ) from e
    return get_attention_backend(backend).fn


# ---- Ulysses ---------------------------------------------------------------------------------------


def _head_groups_to_ranks(t: torch.Tensor, u: int) -> torch.Tensor:
    """``[b, h, s, d]`` (any strides) -> a contiguous send buffer ``[U, b, s, h/U, d]``: head group j to rank j.

    The sequence-major order inside each chunk is the ``[B, S, H, D]`` layout the projections produce, so
    the copy reads long contiguous runs, and what a rank receives is already attention-ready (see below)."""
    b, h, s, d = t.shape
    grouped = t.reshape(b, u, h // u, s, d).permute(1, 0, 3, 2, 4)  # [U, b, s, h/U, d], a view
    if grouped.is_contiguous():
        return grouped
    send = t.new_empty(grouped.shape)
    send.copy_(grouped)
    return send


def _attention_view(recv: torch.Tensor) -> torch.Tensor:
    """``[U, b, s/U, h/U, d]`` (rank j's sequence chunk for my heads) -> ``[b, h/U, S, d]``: a free view when
    b == 1 (the chunks lie in sequence order; memory is ``[S, h/U, d]``, the layout the kernels take)."""
    u, b, s, hu, d = recv.shape
    return recv.permute(1, 3, 0, 2, 4).reshape(b, hu, u * s, d)


def ulysses_all_to_all_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ps.GroupInfo
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, H, S/U, D]`` -> ``[B, H/U, S, D]`` (sequence in rank order) for q, k and v.

    One copy per tensor (into its send buffer) and none after: three asynchronous all-to-alls, so q's
    transfer runs while k and v are copied."""
    u = group.world_size
    h = q.shape[1]
    if h % u:
        raise ValueError(f"ulysses all-to-all needs heads ({h}) divisible by the ulysses degree ({u})")
    return _receive_qkv(_send_qkv(q, k, v, group))


Transfers = list[tuple[torch.Tensor, Any]]  # (receive buffer, its all-to-all work handle or None)


def _send_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ps.GroupInfo) -> Transfers:
    """Start the three asynchronous all-to-alls (one copy per tensor into its send buffer)."""
    return [_all_to_all(_head_groups_to_ranks(t, group.world_size), group, async_op=True) for t in (q, k, v)]


def _all_to_all(send: torch.Tensor, group: ps.GroupInfo, async_op: bool) -> tuple[torch.Tensor, Any]:
    """(receive buffer, work handle or None). Under torch.compile the functional collective, which dynamo
    traces (the compiled blocks keep one graph and inductor places the wait); eager, the c10d call."""
    if torch.compiler.is_compiling():
        return funcol.all_to_all_single(send, None, None, group.group), None
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group.group, async_op=async_op)
    return recv, work if async_op else None


def _receive_qkv(transfers: Transfers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wait for `_send_qkv`'s transfers; q, k, v as attention-ready ``[b, h/U, S, d]`` views."""
    received = []
    for recv, work in transfers:
        if work is not None:
            work.wait()
        received.append(_attention_view(recv))
    return received[0], received[1], received[2]


def _ulysses_back(x: torch.Tensor, group: ps.GroupInfo) -> torch.Tensor:
    """Inverse all-to-all: ``[B, H/U, S, *rest]`` -> ``[B, H, S/U, *rest]`` (rest = (D,) for out, () for lse).

    The result's memory is ``[B, S/U, H, *rest]`` (a transposed view), which the processors flatten into
    the output projection's input without another copy."""
    recv, _ = _all_to_all(_sequence_chunks_to_ranks(x, group.world_size), group, async_op=False)
    return _heads_last(recv).transpose(1, 2)


def _sequence_chunks_to_ranks(x: torch.Tensor, u: int) -> torch.Tensor:
    """``[b, h/U, S, *rest]`` -> a contiguous send buffer ``[U, b, S/U, h/U, *rest]``: sequence chunk j goes to
    rank j (free when x's memory is already ``[b, S, h/U, *rest]``)."""
    b, hu, s_full = x.shape[:3]
    rest = tuple(x.shape[3:])
    tail = tuple(range(4, 4 + len(rest)))
    chunks = x.reshape(b, hu, u, s_full // u, *rest).permute(2, 0, 3, 1, *tail)
    return chunks if chunks.is_contiguous() else chunks.contiguous()


def _heads_last(recv: torch.Tensor) -> torch.Tensor:
    """``[U, b, s, h/U, *rest]`` (recv[j] = head group j of my sequence chunk) -> ``[b, s, U*h/U, *rest]``."""
    u, b, s, hu = recv.shape[:4]
    rest = tuple(recv.shape[4:])
    tail = tuple(range(4, 4 + len(rest)))
    return recv.permute(1, 2, 0, 3, *tail).reshape(b, s, u * hu, *rest)


# ---- Ring ------------------------------------------------------------------------------------------


def _merge(
    out: torch.Tensor | None, lse: torch.Tensor | None, blk_out: torch.Tensor, blk_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax-attention results with their LSEs, in float32."""
    blk_out = blk_out.float()
    blk_lse = blk_lse.float()
    if out is None or lse is None:
        return blk_out, blk_lse
    new_lse = torch.logaddexp(lse, blk_lse)  # [b, h, s]
    out = out * torch.exp(lse - new_lse).unsqueeze(-1) + blk_out * torch.exp(blk_lse - new_lse).unsqueeze(-1)
    return out, new_lse


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ps.GroupInfo,
    inner: AttentionFn,
    softmax_scale: float,
    kv_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``group``; K/V block of group rank ``j`` covers global keys ``[j*S, (j+1)*S)``.

    Returns ``(out [B, H, S, D] float32, lse [B, H, S] float32)``.
    """
    r = group.world_size
    me = group.rank_in_group
    s_blk = k.shape[2]
    kv = torch.stack((k, v)).contiguous()  # [2, b, h, s_blk, d]: one message per hop
    spare = torch.empty_like(kv)
    nxt, prv = group.global_rank(me + 1), group.global_rank(me - 1)
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for step in range(r):
        reqs = []
        if step < r - 1:
            # Post the next hop before computing so the transfer overlaps the local attention.
            reqs = dist.batch_isend_irecv(
                [
                    dist.P2POp(dist.isend, kv, nxt, group.group),
                    dist.P2POp(dist.irecv, spare, prv, group.group),
                ]
            )
        src = (me - step) % r  # owner of the block held at this step
        valid = s_blk if kv_len is None else max(0, min(s_blk, kv_len - src * s_blk))
        if valid > 0:  # a block of padding only contributes nothing (its LSE would be -inf)
            blk_out, blk_lse = inner(
                q, kv[0], kv[1], softmax_scale=softmax_scale, kv_len=None if valid == s_blk else valid, return_lse=True
            )
            out, lse = _merge(out, lse, blk_out, blk_lse)
        for req in reqs:
            req.wait()
        if reqs:
            kv, spare = spare, kv
    if out is None or lse is None:
        raise ValueError(f"ring attention: kv_len={kv_len} leaves no valid key in the whole sequence")
    return out, lse


# ---- public callable --------------------------------------------------------------------------------


class SequenceParallelAttention:
    """Attention over the sequence sharded across the SP group, following the ``parallel_state`` layout.

    Built once per process after ``init_parallel_state``; it captures the groups of the current layout.
    """

    def __init__(self, inner: str | AttentionFn = "sdpa") -> None:
        self.inner: AttentionFn = resolve_attention_backend(inner)
        self.sp = ps.get_sp_group()
        self.ulysses = ps.get_ulysses_group()
        self.ring = ps.get_ring_group()
        self._warned_heads: set[int] = set()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ulysses={self.ulysses.world_size}, ring={self.ring.world_size}, "
            f"inner={getattr(self.inner, '__name__', type(self.inner).__name__)})"
        )

    def plan(self, num_heads: int) -> str:
        """'local', 'ulysses', 'ring', 'hybrid' or 'ring-fallback' for this head count."""
        u, r = self.ulysses.world_size, self.ring.world_size
        if u * r == 1:
            return "local"
        if num_heads % u:
            return "ring-fallback"
        if u == 1:
            return "ring"
        if r > 1:
            return "hybrid"
        return "ulysses"

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        softmax_scale: float | None = None,
        kv_len: int | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
            raise ValueError(
                "sequence-parallel attention takes q, k, v of the same shape [B, H, S_local, D] (self / joint "
                f"attention over the sharded sequence); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}. Cross-attention to replicated keys must call the local backend."
            )
        b, h, s, d = q.shape
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
        if kv_len is not None and kv_len >= s * self.sp.world_size:
            kv_len = None
        plan = self.plan(h)
        if plan == "local":
            return self.inner(q, k, v, softmax_scale=scale, kv_len=kv_len, return_lse=return_lse)
        if plan == "ring-fallback":
            if h not in self._warned_heads:
                self._warned_heads.add(h)
                logger.info(
                    "%d heads not divisible by ulysses degree %d: ring attention over the SP group (%d ranks)",
                    h, self.ulysses.world_size, self.sp.world_size,
                )
            out, lse = ring_attention(q, k, v, group=self.sp, inner=self.inner, softmax_scale=scale, kv_len=kv_len)
            out = out.to(q.dtype)
            return (out, lse) if return_lse else out

        u = self.ulysses.world_size
        if u > 1:
            q, k, v = ulysses_all_to_all_qkv(q, k, v, self.ulysses)  # [b, h, s, d] -> [b, h/U, U*s, d]
        if self.ring.world_size > 1:
            out, lse = ring_attention(q, k, v, group=self.ring, inner=self.inner, softmax_scale=scale, kv_len=kv_len)
            out = out.to(q.dtype)
        elif return_lse:
            out, lse = self.inner(q, k, v, softmax_scale=scale, kv_len=kv_len, return_lse=True)
        else:
            out, lse = self.inner(q, k, v, softmax_scale=scale, kv_len=kv_len, return_lse=False), None
        if u > 1:
            out = _ulysses_back(out, self.ulysses)  # [b, h/U, U*s, d] -> [b, h, s, d]
            if return_lse and lse is not None:
                lse = _ulysses_back(lse.float().contiguous(), self.ulysses)  # [b, h/U, U*s] -> [b, h, s]
        return (out, lse) if return_lse else out
