"""Sequence-parallel and CFG-parallel execution of diffusers transformers, driven by the family's plan.

``parallelize_transformer(transformer, config)`` asks the transformer's model family for its
:class:`~smart_diffusion_backend.families.spec.SequencePlan` and installs forward hooks that

1. cut the joint sequence (the plan's segments in order, e.g. ``[text; image]``) into ``sp_world_size``
   contiguous chunks of ``S_local = ceil(L / P)`` tokens, zero-padding the end of the last segment when
   ``L`` does not divide (padded keys are masked through ``kv_len``, padded outputs dropped); each input the
   plan names is cut to this rank's part of its segment, at the transformer's input or at the submodule
   the plan names (where the tokens are built);
2. install, through ``smart_diffusion_backend.attention.processors.install_attention``, a callable that
   sends self / joint attention (``seq_q == seq_kv``) to :class:`SequenceParallelAttention` with the
   forward's ``kv_len``, and cross-attention (``seq_q != seq_kv``: keys of a text or image context, whole
   on every rank) to the local backend. So that this test can never mistake a cross-attention for a
   self-attention, ``S_local`` is bumped (more padding) while it equals a cross-attention key length the
   plan lists. An attention module the plan lists in ``segment_attention`` attends within the leading
   segments only (e.g. image tokens beside a joint [image; text] attention): :class:`SegmentAttentionDispatch`
   pads this rank's part of them to the chunk and masks the keys past their global length;
3. all-gather the output of the plan's gather module (``proj_out``) over the SP group, so every rank
   returns the full prediction.

CFG parallel: :func:`cfg_parallel` runs the conditional branch on CFG rank 0 and the unconditional on
CFG rank 1 and all-gathers both predictions over the CFG group.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..attention.processors import install_attention
from ..families import family_of
from ..families.spec import Family, Gather, SequencePlan, Split
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
    cut: "_Cut | None" = None  # this rank's part of each segment (the plan's segment attentions read it)


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


class SegmentAttentionDispatch:
    """The callable of an attention module whose self-attention covers only the leading ``segments`` of the
    joint sequence (``SequencePlan.segment_attention``). This rank holds a prefix of its chunk of them; it is
    zero-padded to the chunk length, so the SP attention sees the usual layout, and every key past the
    segments' global length is masked (kv_len); the padded query rows are dropped again."""

    def __init__(self, sp_attention: SequenceParallelAttention, context: SPForwardContext, segments: tuple[str, ...]):
        self.sp_attention = sp_attention
        self.context = context
        self.segments = segments

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
        cut = self.context.cut
        if cut is None:
            raise RuntimeError("segment attention called outside a sequence-parallel forward")
        held = sum(cut._local_len(segment) for segment in self.segments)
        if q.shape[2] != held or k.shape[2] != held:
            raise ValueError(
                f"attention over the {'+'.join(self.segments)} tokens: this rank holds {held}, got q "
                f"{tuple(q.shape)}, k {tuple(k.shape)}"
            )
        valid = sum(cut.tokens[segment] for segment in self.segments)
        if kv_len is not None:
            valid = min(valid, kv_len)
        q, k, v = (_pad_to(x, 2, cut.layout.local_len) for x in (q, k, v))
        result = self.sp_attention(q, k, v, softmax_scale=softmax_scale, kv_len=valid, return_lse=return_lse)
        if return_lse:
            out, lse = result
            return out[:, :, :held], lse[:, :, :held]
        return result[:, :, :held]


@dataclass
class SPTransformerHandle:
    """What :func:`parallelize_transformer` installed; ``remove()`` restores the transformer."""

    transformer: torch.nn.Module
    family: str  # the model family's name
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


# ---- cutting by the family's plan ---------------------------------------------------------------------


class _Cut:
    """This rank's part of one forward's joint sequence: per segment, the range of its tokens it holds.

    A rank's chunk is the concatenation of its parts in segment order; the padding is appended to the
    part of the last segment."""

    def __init__(self, segments: tuple[str, ...], tokens: dict[str, int], layout: ShardLayout):
        self.segments, self.tokens, self.layout = segments, tokens, layout
        self.parts: dict[str, tuple[int, int]] = {}
        offset = 0
        for segment in segments:
            n = tokens[segment]
            self.parts[segment] = (min(max(layout.start - offset, 0), n), min(max(layout.end - offset, 0), n))
            offset += n
        self.pad = layout.local_len - sum(end - start for start, end in self.parts.values())

    def _local_len(self, segment: str) -> int:
        start, end = self.parts[segment]
        return end - start + (self.pad if segment == self.segments[-1] else 0)

    def cut(self, x: torch.Tensor, split: Split) -> torch.Tensor:
        """This rank's part of ``x`` (all of the segment's tokens along ``split.dim``), zero-padded."""
        if x.shape[split.dim] != self.tokens[split.segment]:
            raise ValueError(
                f"expected {self.tokens[split.segment]} {split.segment} tokens along dim {split.dim}, "
                f"got shape {tuple(x.shape)}"
            )
        start, end = self.parts[split.segment]
        return _pad_to(x.narrow(split.dim, start, end - start), split.dim, self._local_len(split.segment)).contiguous()

    def apply(self, value: Any, split: Split) -> Any:
        """``value`` cut as ``split`` says (a list element-wise; None, or a tensor of another rank, as is)."""
        if value is None:
            return None
        if split.each:
            return [self.cut(x, split) for x in value]
        if split.ndim is not None and value.ndim != split.ndim:
            return value
        return self.cut(value, split)

    def gather(self, x: torch.Tensor, gather: Gather, group: ps.GroupInfo) -> torch.Tensor:
        """All-gather this rank's output tokens (its parts of ``gather.segments``) -> those segments' tokens."""
        dim = gather.dim
        if gather.segments == self.segments:
            chunk = x
        else:  # the other segments' slots of the chunk stay zero
            shape = list(x.shape)
            shape[dim] = self.layout.local_len
            chunk = x.new_zeros(shape)
            at = taken = 0
            for segment in self.segments:
                n = self._local_len(segment)
                if segment in gather.segments:
                    chunk.narrow(dim, at, n).copy_(x.narrow(dim, taken, n))
                    taken += n
                at += n
        full = gather_sequence(chunk, dim, group)  # [.., P * S_local, ..]
        parts, offset = [], 0
        for segment in self.segments:
            if segment in gather.segments:
                parts.append(full.narrow(dim, offset, self.tokens[segment]))
            offset += self.tokens[segment]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _install_plan(handle: SPTransformerHandle, plan: SequencePlan, sp: ps.GroupInfo) -> None:
    model = handle.transformer
    state: dict[str, _Cut] = {}

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        kw = _bind(module.forward, args, kwargs)
        missing = [name for name in plan.required if kw.get(name) is None]
        if missing:
            raise ValueError(f"sequence-parallel {handle.family} needs {', '.join(plan.required)}; missing {missing}")
        if plan.prepare is not None:
            plan.prepare(kw)
        tokens = dict(plan.tokens(kw, module.config))
        avoid = plan.cross_attention_lengths(kw) if plan.cross_attention_lengths is not None else frozenset()
        cut = state["cut"] = _Cut(plan.segments, tokens, shard_layout(sum(tokens.values()), sp, avoid))
        handle.context.kv_len = cut.layout.kv_len
        handle.context.cut = cut
        for name, split in plan.inputs.get("", {}).items():
            if name in kw:
                kw[name] = cut.apply(kw[name], split)
        return (), kw

    def input_hook(splits: dict[str, Split]):
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
            cut = state["cut"]
            args, kwargs = list(args), dict(kwargs)
            for name, split in splits.items():
                if name in kwargs:
                    kwargs[name] = cut.apply(kwargs[name], split)
                elif split.position is not None and split.position < len(args):
                    args[split.position] = cut.apply(args[split.position], split)
            return tuple(args), kwargs

        return hook

    def output_hook(split: Split):
        def hook(module: torch.nn.Module, args: Any, output: Any):
            cut = state["cut"]
            if isinstance(output, tuple):
                return tuple(cut.apply(x, split) for x in output)
            return cut.apply(output, split)

        return hook

    def gather_hook(module: torch.nn.Module, args: Any, output: torch.Tensor):
        return state["cut"].gather(output, plan.gather, sp)

    def post_hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any):
        state.pop("cut", None)
        handle.context.kv_len = None
        handle.context.cut = None
        return output

    handle.hooks.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    for path, splits in plan.inputs.items():
        if path:
            hook = input_hook(dict(splits))
            handle.hooks.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    for path, split in plan.outputs.items():
        handle.hooks.append(model.get_submodule(path).register_forward_hook(output_hook(split)))
    handle.hooks.append(model.get_submodule(plan.gather.module).register_forward_hook(gather_hook))
    handle.hooks.append(model.register_forward_hook(post_hook, with_kwargs=True))


def _install_segment_attention(handle: SPTransformerHandle, family: Family, plan: SequencePlan) -> None:
    """The plan's attention modules over leading segments get a processor calling SegmentAttentionDispatch."""
    for pattern, segments in plan.segment_attention.items():
        segments = tuple(segments)
        if not segments or plan.segments[: len(segments)] != segments:
            raise ValueError(
                f"{handle.family}: segment attention {pattern!r} over {segments}: must be leading segments of "
                f"{plan.segments}"
            )
        processor = family.attention_processor_class()(SegmentAttentionDispatch(handle.attention, handle.context, segments))
        for name, module in handle.transformer.named_modules():
            if fnmatch.fnmatchcase(name, pattern) and hasattr(module, "set_processor"):
                module.set_processor(processor)


# ---- public -------------------------------------------------------------------------------------------


def parallelize_transformer(
    transformer: torch.nn.Module, config: SPTransformerConfig | None = None, family: Family | None = None
) -> SPTransformerHandle:
    """Make ``transformer`` run sequence-parallel over the SP group of ``parallel_state``.

    ``family``: the transformer's model family, whose sequence plan and attention processor are used
    (default: the family that registers the transformer's class). Every rank of the SP group must call the
    transformer with the same full inputs; each returns the full output. With an SP group of one rank only
    the processors change (to the chosen attention backend).
    """
    config = config or SPTransformerConfig()
    layout = ps.get_parallel_config()
    if config.expected is not None and config.expected != layout:
        raise ValueError(f"SPTransformerConfig.expected={config.expected} but parallel_state holds {layout}")
    family = family or family_of(transformer)
    if getattr(transformer, "_sd_sp_handle", None) is not None:
        raise ValueError("transformer is already parallelized; call handle.remove() first")
    local = resolve_attention_backend(config.attention_backend)
    sp_attn = SequenceParallelAttention(local)
    context = SPForwardContext()
    handle = SPTransformerHandle(
        transformer, family.name, sp_attn, context, old_processors=dict(transformer.attn_processors)
    )
    install_attention(transformer, SPAttentionDispatch(sp_attn, local, context), family)
    sp = ps.get_sp_group()
    if sp.world_size > 1:
        _install_plan(handle, family.sequence_plan, sp)
        _install_segment_attention(handle, family, family.sequence_plan)
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
