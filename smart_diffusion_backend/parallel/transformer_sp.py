"""Sequence-parallel and CFG-parallel execution of diffusers Flux / Wan transformers.

``parallelize_transformer(transformer, config)`` installs forward hooks that

1. cut the joint sequence into ``sp_world_size`` contiguous chunks of ``S_local = ceil(L / P)`` tokens,
   zero-padding the end of the sequence when ``L`` does not divide (padded keys are masked through
   ``kv_len``, padded outputs dropped),
2. install, through ``smart_diffusion_backend.attention.processors.install_attention``, a callable that
   sends self / joint attention (``seq_q == seq_kv``) to :class:`SequenceParallelAttention` with the
   forward's ``kv_len``, and cross-attention (``seq_q != seq_kv``: Wan text / I2V image context) to the
   local backend,
3. all-gather the output of ``proj_out`` over the SP group so every rank returns the full prediction.

Flux: the joint sequence is ``[text (T); image (N)]``; a chunk can hold text, image or both, so each rank
passes its part of ``encoder_hidden_states`` / ``txt_ids`` and of ``hidden_states`` / ``img_ids``; the
rotary embedding is computed from the local ids, consistent by construction.
Wan: the patchified video tokens and the rotary embedding are cut right after they are built (hooks on
``rope`` and ``blocks.0``); cross-attention keys (text) stay whole on every rank. So that the
``seq_q != seq_kv`` test can never mistake a cross-attention for a self-attention, ``S_local`` is bumped
by one (more padding) when it would equal a cross-attention key length.

CFG parallel: :func:`cfg_parallel` runs the conditional branch on CFG rank 0 and the unconditional on
CFG rank 1 and all-gathers both predictions over the CFG group.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from . import parallel_state as ps
from .sp_attention import AttentionFn, SequenceParallelAttention, resolve_attention_backend

__all__ = [
    "SPAttentionDispatch",
    "SPForwardContext",
    "SPTransformerConfig",
    "SPTransformerHandle",
    "parallelize_transformer",
    "cfg_parallel",
    "shard_layout",
    "gather_sequence",
]


@dataclass(frozen=True)
class SPTransformerConfig:
    """How to parallelize one transformer; the degrees come from ``parallel_state``."""

    attention_backend: str | AttentionFn = "sdpa"  # inner (local) attention: registry name or callable
    expected: ps.ParallelConfig | None = None  # when set, must equal the initialised layout


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's chunk of a sequence of ``length`` tokens sits (chunks of ``local_len`` tokens)."""

    length: int  # valid tokens
    world_size: int
    rank: int
    local_len: int

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world_size

    @property
    def start(self) -> int:
        return self.rank * self.local_len

    @property
    def end(self) -> int:
        return self.start + self.local_len

    @property
    def kv_len(self) -> int | None:
        return None if self.padded_len == self.length else self.length


def shard_layout(length: int, group: ps.GroupInfo, avoid: frozenset[int] = frozenset()) -> ShardLayout:
    """Even chunks of ``ceil(length / P)`` tokens; ``avoid``: chunk sizes not to use (cross-attn key lengths)."""
    if length < 1:
        raise ValueError(f"cannot shard an empty sequence (length {length})")
    local_len = math.ceil(length / group.world_size)
    while group.world_size > 1 and local_len in avoid:
        local_len += 1
    return ShardLayout(length, group.world_size, group.rank_in_group, local_len)


def _pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _shard(x: torch.Tensor, dim: int, layout: ShardLayout) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (padded with zeros at the end of the sequence)."""
    if x.shape[dim] != layout.length:
        raise ValueError(f"expected {layout.length} tokens along dim {dim}, got shape {tuple(x.shape)}")
    return _pad_to(x, dim, layout.padded_len).narrow(dim, layout.start, layout.local_len).contiguous()


def gather_sequence(x: torch.Tensor, dim: int, group: ps.GroupInfo) -> torch.Tensor:
    """All-gather equal chunks along ``dim`` in group-rank order."""
    if group.world_size == 1:
        return x
    x = x.contiguous()
    if x.is_cuda:
        # One flat buffer (NCCL all-gather into a tensor), then [P, *shape] -> concatenated along ``dim``.
        out = x.new_empty((group.world_size, *x.shape))
        dist.all_gather_into_tensor(out, x, group=group.group)
        return torch.cat(out.unbind(0), dim=dim)
    parts = [torch.empty_like(x) for _ in range(group.world_size)]
    dist.all_gather(parts, x, group=group.group)
    return torch.cat(parts, dim=dim)


@dataclass
class SPForwardContext:
    """Per-forward facts the hooks hand to the attention callable (reset at every forward)."""

    kv_len: int | None = None  # valid keys of the global joint sequence; None = no padding


class SPAttentionDispatch:
    """The callable given to ``install_attention``: SP for self / joint attention, local for cross-attention."""

    def __init__(self, sp_attention: SequenceParallelAttention, local: AttentionFn, context: SPForwardContext):
        self.sp_attention = sp_attention
        self.local = local
        self.context = context

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
        if k.shape[2] != q.shape[2]:  # cross-attention: the keys are whole on every rank
            return self.local(q, k, v, softmax_scale=softmax_scale, kv_len=kv_len, return_lse=return_lse)
        return self.sp_attention(
            q, k, v, softmax_scale=softmax_scale, kv_len=self.context.kv_len if kv_len is None else kv_len,
            return_lse=return_lse,
        )


@dataclass
class SPTransformerHandle:
    """What :func:`parallelize_transformer` installed; ``remove()`` restores the transformer."""

    transformer: torch.nn.Module
    kind: str  # "flux" | "wan"
    attention: SequenceParallelAttention
    context: SPForwardContext
    hooks: list[Any] = field(default_factory=list)
    old_processors: dict[str, Any] | None = None

    def remove(self) -> None:
        if getattr(self.transformer, "_sd_sp_handle", None) is self:
            self.transformer._sd_sp_handle = None
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        if self.old_processors is not None:
            self.transformer.set_attn_processor(self.old_processors)
            self.old_processors = None


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(inspect.signature(fn).bind(*args, **kwargs).arguments)


# ---- Flux ---------------------------------------------------------------------------------------------


@dataclass
class _FluxCall:
    text: int
    image: int
    layout: ShardLayout
    t0: int
    t1: int
    i0: int
    i1: int


def _parallelize_flux(handle: SPTransformerHandle, sp: ps.GroupInfo) -> None:
    model = handle.transformer
    state: dict[str, _FluxCall] = {}

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        kw = _bind(module.forward, args, kwargs)
        hs, ehs = kw["hidden_states"], kw["encoder_hidden_states"]
        img_ids, txt_ids = kw["img_ids"], kw["txt_ids"]
        if hs is None or ehs is None or img_ids is None or txt_ids is None:
            raise ValueError("sequence-parallel Flux needs hidden_states, encoder_hidden_states, img_ids and txt_ids")
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # deprecated batched ids: same for all items
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        t, n = ehs.shape[1], hs.shape[1]
        layout = shard_layout(t + n, sp)
        # Joint order [text; image; padding]: the chunk [start, end) splits into a text and an image range.
        t0, t1 = min(layout.start, t), min(layout.end, t)
        i0, i1 = min(max(layout.start - t, 0), n), min(max(layout.end - t, 0), n)
        pad = layout.local_len - (t1 - t0) - (i1 - i0)
        kw["encoder_hidden_states"] = ehs[:, t0:t1].contiguous()
        kw["txt_ids"] = txt_ids[t0:t1]
        kw["hidden_states"] = _pad_to(hs[:, i0:i1], 1, i1 - i0 + pad).contiguous()
        kw["img_ids"] = _pad_to(img_ids[i0:i1], 0, i1 - i0 + pad)
        for key in ("controlnet_block_samples", "controlnet_single_block_samples"):
            if kw.get(key) is not None:  # image-token residuals follow the image tokens
                kw[key] = [_pad_to(s[:, i0:i1], 1, i1 - i0 + pad) for s in kw[key]]
        state["call"] = _FluxCall(t, n, layout, t0, t1, i0, i1)
        handle.context.kv_len = layout.kv_len
        return (), kw

    def post_hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any):
        call = state.pop("call")
        handle.context.kv_len = None
        sample = output[0] if isinstance(output, tuple) else output.sample  # [b, image part + pad, c]
        b, _, c = sample.shape
        chunk = sample.new_zeros(b, call.layout.local_len, c)  # [b, S_local, c]: text slots left at zero
        chunk[:, call.t1 - call.t0 :] = sample
        full = gather_sequence(chunk, 1, sp)  # [b, S_local, c] -> [b, P * S_local, c]
        sample = full[:, call.text : call.text + call.image]  # [b, N, c]
        if isinstance(output, tuple):
            return (sample,) + tuple(output[1:])
        output.sample = sample
        return output

    handle.hooks.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    handle.hooks.append(model.register_forward_hook(post_hook, with_kwargs=True))


# ---- Wan ----------------------------------------------------------------------------------------------


def _parallelize_wan(handle: SPTransformerHandle, sp: ps.GroupInfo) -> None:
    model = handle.transformer
    state: dict[str, ShardLayout] = {}

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        kw = _bind(module.forward, args, kwargs)
        hs = kw["hidden_states"]  # [b, c, f, h, w]
        p_t, p_h, p_w = module.config.patch_size
        _, _, f, h, w = hs.shape
        # Key lengths of the cross-attentions (text, I2V image context, their sum, diffusers' 512 split).
        text = kw["encoder_hidden_states"].shape[1]
        image = kw["encoder_hidden_states_image"].shape[1] if kw.get("encoder_hidden_states_image") is not None else 0
        avoid = frozenset({text, image, text + image, 512, text + image - 512})
        layout = shard_layout((f // p_t) * (h // p_h) * (w // p_w), sp, avoid)
        state["layout"] = layout
        handle.context.kv_len = layout.kv_len
        ts = kw["timestep"]
        if ts is not None and ts.ndim == 2:  # Wan 2.2 TI2V: one timestep per token
            kw["timestep"] = _shard(ts, 1, layout)
        return (), kw

    def rope_hook(module: torch.nn.Module, args: Any, output: tuple[torch.Tensor, torch.Tensor]):
        layout = state["layout"]
        return tuple(_shard(x, 1, layout) for x in output)  # [1, S, 1, d] -> [1, S_local, 1, d]

    def block0_pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        layout = state["layout"]
        if args:
            return (_shard(args[0], 1, layout),) + tuple(args[1:]), kwargs  # [b, S, c] -> [b, S_local, c]
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = _shard(kwargs["hidden_states"], 1, layout)
        return args, kwargs

    def proj_out_hook(module: torch.nn.Module, args: Any, output: torch.Tensor):
        layout = state["layout"]
        return gather_sequence(output, 1, sp)[:, : layout.length]  # [b, S_local, c] -> [b, S, c]

    def post_hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any):
        state.pop("layout", None)
        handle.context.kv_len = None
        return output

    handle.hooks.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    handle.hooks.append(model.rope.register_forward_hook(rope_hook))
    handle.hooks.append(model.blocks[0].register_forward_pre_hook(block0_pre_hook, with_kwargs=True))
    handle.hooks.append(model.proj_out.register_forward_hook(proj_out_hook))
    handle.hooks.append(model.register_forward_hook(post_hook, with_kwargs=True))


# ---- public -------------------------------------------------------------------------------------------


def _model_kind(transformer: torch.nn.Module) -> str:
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "WanTransformer3DModel":
        return "wan"
    raise ValueError(f"parallelize_transformer supports FluxTransformer2DModel and WanTransformer3DModel, got {name}")


def parallelize_transformer(
    transformer: torch.nn.Module, config: SPTransformerConfig | None = None
) -> SPTransformerHandle:
    """Make ``transformer`` run sequence-parallel over the SP group of ``parallel_state``.

    Every rank of the SP group must call the transformer with the same full inputs; each returns the full
    output. With an SP group of one rank only the processors change (to the chosen attention backend).
    """
    from smart_diffusion_backend.attention.processors import install_attention

    config = config or SPTransformerConfig()
    layout = ps.get_parallel_config()
    if config.expected is not None and config.expected != layout:
        raise ValueError(f"SPTransformerConfig.expected={config.expected} but parallel_state holds {layout}")
    kind = _model_kind(transformer)
    if getattr(transformer, "_sd_sp_handle", None) is not None:
        raise ValueError("transformer is already parallelized; call handle.remove() first")
    local = resolve_attention_backend(config.attention_backend)
    sp_attn = SequenceParallelAttention(local)
    context = SPForwardContext()
    handle = SPTransformerHandle(transformer, kind, sp_attn, context, old_processors=dict(transformer.attn_processors))
    install_attention(transformer, SPAttentionDispatch(sp_attn, local, context))
    sp = ps.get_sp_group()
    if sp.world_size > 1:
        (_parallelize_flux if kind == "flux" else _parallelize_wan)(handle, sp)
    transformer._sd_sp_handle = handle
    return handle


def cfg_parallel(
    fn: Callable[..., torch.Tensor], cond_kwargs: dict[str, Any], uncond_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(**cond_kwargs), fn(**uncond_kwargs))`` on every rank, one branch per CFG half of the world.

    With ``cfg_degree == 1`` both branches run here, one after the other.
    """
    cfg = ps.get_cfg_group()
    if cfg.world_size == 1:
        return fn(**cond_kwargs), fn(**uncond_kwargs)
    mine = fn(**(cond_kwargs if cfg.rank_in_group == 0 else uncond_kwargs)).contiguous()
    # Noise predictions are latent-shaped, so both branches match even when the two prompts differ in length.
    parts = [torch.empty_like(mine) for _ in range(cfg.world_size)]
    dist.all_gather(parts, mine, group=cfg.group)
    return parts[0], parts[1]
