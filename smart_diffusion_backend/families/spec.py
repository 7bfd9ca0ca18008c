"""What a model family declares about itself, torch-free.

Each family folder (``families/<name>/``) has a ``spec.py`` with one :class:`Family`: the only description of
its model that the rest of the library reads. The layers around the families ask it instead of inspecting a
transformer:

* ``stage_shapes`` / the repository generator: :meth:`Family.wire_dims` (from the weights' config.json);
* the feature cache: :attr:`Family.block_stacks` and :attr:`Family.cache_points`;
* attention: :meth:`Family.attention_processor_class`, the diffusers processor it installs;
* sequence parallelism: :attr:`Family.sequence_plan`;
* the service and the pools: :meth:`Family.stage_class`.

Everything here, and every family's ``spec.py``, imports without torch: processes that never touch a tensor
(the repository generator, the orchestrators) read wire shapes from it. The stage classes and the attention
processor are named as ``"module:Class"`` (relative to the family's package) and imported on first use.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol

from ..errors import ConfigError

StageKind = Literal["text_encoder", "denoiser", "decoder"]
STAGE_KINDS: tuple[StageKind, ...] = ("text_encoder", "denoiser", "decoder")


@dataclass(frozen=True)
class WireDims:
    """The fixed dimensions of the tensors between the stages (stage_shapes.py builds the checks on them)."""

    text_dim: int  # PROMPT_EMBEDS [rows, text_len, text_dim]
    pooled_dim: int  # POOLED_PROMPT_EMBEDS [rows, pooled_dim]; 0 for a family without a pooled embedding
    channels: int  # LATENTS [1, channels, ...]
    spatial_scale: int  # pixels per latent row / column
    temporal_scale: int | None  # video frames per latent frame (after the first); None for images


class CachePoints(Protocol):
    """How the blocks of a family's cached stack take and return their streams (the cache's hook points).

    The stack is the blocks of :attr:`Family.block_stacks` in call order. Every block takes the streams
    ``hidden_states`` (and ``encoder_hidden_states`` where the stack carries the text too) and returns them;
    the cache keeps the residual of each stream between the stack's input and output.
    """

    def inputs(self, args: tuple, kwargs: dict) -> tuple[Any, Any | None]:
        """A block's (hidden_states, encoder_hidden_states or None) from its call arguments."""

    def outputs(self, output: Any) -> tuple[Any, Any | None]:
        """A block's (hidden_states, encoder_hidden_states or None) from its return value."""

    def pack(self, hidden_states: Any, encoder_hidden_states: Any | None) -> Any:
        """The return value of a block, built from its streams (what a skipped block returns)."""

    def modulated_input(self, block: Any, args: tuple, kwargs: dict) -> Any:
        """TeaCache's metric input: the first block's timestep-modulated hidden states."""


@dataclass(frozen=True)
class Split:
    """Cut one tensor to this rank's part of the ``segment`` tokens, along ``dim``."""

    segment: str
    dim: int
    position: int | None = None  # where the argument sits when the module is called positionally
    ndim: int | None = None  # cut only a tensor of this rank (others are not per-token and pass whole)
    each: bool = False  # the argument is a list of tensors, each cut the same way


@dataclass(frozen=True)
class Gather:
    """The module whose output holds this rank's tokens along ``dim``; all-gathered there."""

    module: str
    dim: int
    segments: tuple[str, ...]  # the segments that output holds, in joint order


@dataclass(frozen=True)
class SequencePlan:
    """How sequence parallelism cuts one forward of the family's transformer (parallel/transformer_sp.py).

    The joint sequence the attention sees is ``segments`` in order; each rank of the SP group holds one
    contiguous chunk of it. A chunk that covers several segments holds a part of each, and the padding
    (when the ranks do not divide the length) sits at the end of the last segment. Every rank calls the
    transformer with the full inputs and gets the full output back.
    """

    segments: tuple[str, ...]
    # (the forward's bound arguments, the transformer's config) -> tokens per segment
    tokens: Callable[[Mapping[str, Any], Any], Mapping[str, int]]
    # module path ("" = the transformer's own forward) -> argument name -> how it is cut (before the call)
    inputs: Mapping[str, Mapping[str, Split]]
    # module path -> how its output is cut (every tensor of a tuple output)
    outputs: Mapping[str, Split]
    gather: Gather
    required: tuple[str, ...] = ()  # forward arguments that must not be None
    # normalises the bound forward arguments in place before they are cut
    prepare: Callable[[dict[str, Any]], None] | None = None
    # key lengths of the forward's cross-attentions: a chunk must not have one of these lengths, so the
    # attention can tell self-attention (queries and keys of one length) from cross-attention
    cross_attention_lengths: Callable[[Mapping[str, Any]], frozenset[int]] | None = None
    # attention modules (fnmatch patterns over module paths) whose self-attention covers only the leading
    # segments named here, not the whole joint sequence (e.g. an image-only attention beside a joint one):
    # each rank pads its part of them to its chunk and masks the keys past their global length (kv_len)
    segment_attention: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, eq=False, repr=False)  # one object per family: compared and hashed by identity
class Family:
    """One model family: its stages and everything the library needs to know about its transformer."""

    name: str  # the model yaml's `family:`
    package: str  # the family's package; the "module:Class" references below are relative to it
    stages: Mapping[StageKind, str]  # kind -> "module:Class"
    transformer_classes: tuple[str, ...]  # diffusers classes of its denoiser (registered: `family_of` finds it)
    block_stacks: tuple[str, ...]  # the transformer's ModuleLists the cache hooks, in call order
    cache_points: CachePoints
    attention_processor: str  # "module:Class": the processor taking a pluggable attention callable
    sequence_plan: SequencePlan
    wire_dims: Callable[[Path], WireDims]  # from the weights directory's config.json files
    _resolved: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    def _resolve(self, reference: str) -> Any:
        if reference not in self._resolved:
            module, _, attribute = reference.partition(":")
            self._resolved[reference] = getattr(importlib.import_module(f"{self.package}.{module}"), attribute)
        return self._resolved[reference]

    def stage_class(self, kind: StageKind) -> type:
        if kind not in self.stages:
            raise ValueError(f"unknown stage kind {kind!r}; known: {list(STAGE_KINDS)}")
        return self._resolve(self.stages[kind])

    def attention_processor_class(self) -> type:
        return self._resolve(self.attention_processor)

    def blocks(self, transformer: Any) -> list[Any]:
        """The cached stack of `transformer` in call order: head ``blocks[0]``, tail ``blocks[-1]``."""
        return [block for name in self.block_stacks for block in getattr(transformer, name)]


def call_argument(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """Argument `name` of a call, given by keyword or at position `index`."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > index:
        return args[index]
    raise TypeError(f"block called without '{name}' (positional {index} or keyword)")


def read_config(weights: Path, component: str) -> dict[str, Any]:
    """A component's config.json in a diffusers pipeline directory (ConfigError if unreadable)."""
    path = Path(weights) / component / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
