"""Sequence / CFG parallel execution of the denoiser: process groups, SP attention, transformer hooks,
and the worker pool. See docs/parallel.md.

Nothing is imported up front: ``import smart_diffusion_backend.parallel`` costs nothing, and each name
below loads its own submodule on first access (``from smart_diffusion_backend.parallel import WorkerPool``
imports the pool, not the transformer hooks). Code inside the package imports the submodules directly.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "GroupInfo",
            "ParallelConfig",
            "all_reduce_any",
            "all_reduce_max",
            "barrier",
            "broadcast_decision",
            "destroy_parallel_state",
            "get_cfg_group",
            "get_control_group",
            "get_parallel_config",
            "get_ring_group",
            "get_sp_group",
            "get_ulysses_group",
            "init_parallel_state",
            "set_parallel_degrees",
        ),
        "parallel_state",
    ),
    **dict.fromkeys(("SequenceParallelAttention", "resolve_attention_backend"), "sp_attention"),
    **dict.fromkeys(
        ("SPTransformerConfig", "SPTransformerHandle", "cfg_parallel", "parallelize_transformer"), "transformer_sp"
    ),
    **dict.fromkeys(
        (
            "JobCancelled",
            "JobCancelledError",
            "WorkerContext",
            "WorkerDiedError",
            "WorkerJobError",
            "WorkerPool",
            "WorkerPoolError",
            "WorkerTimeoutError",
        ),
        "worker_pool",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
