"""Regional torch.compile of a transformer's repeated blocks (single-GPU step speed).

diffusers 0.42 models declare ``_repeated_blocks`` (Flux: FluxTransformerBlock, FluxSingleTransformerBlock;
Wan: WanTransformerBlock) and ``ModelMixin.compile_repeated_blocks`` compiles each such block in place.
Blocks of one class share a compiled graph, so compile time is that of one or two blocks, not the model.
Call after ``install_attention``: the processors are traced into the block graphs (our Triton kernel is the
opaque custom op ``smart_diffusion::flash_attention`` there).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["compile_repeated_blocks", "warm_up_compiled"]


def compile_repeated_blocks(transformer: torch.nn.Module, *, mode: str | None = None, fullgraph: bool = True,
                            dynamic: bool = False, **compile_kwargs: Any) -> None:
    """torch.compile each repeated block of ``transformer`` in place (lazy: compiles on the first forward)."""
    if not hasattr(transformer, "compile_repeated_blocks"):
        raise ValueError(f"compile_repeated_blocks: {type(transformer).__name__} is not a diffusers ModelMixin")
    if not getattr(transformer, "_repeated_blocks", None):
        raise ValueError(f"compile_repeated_blocks: {type(transformer).__name__} declares no _repeated_blocks")
    transformer.compile_repeated_blocks(mode=mode, fullgraph=fullgraph, dynamic=dynamic, **compile_kwargs)


def warm_up_compiled(forward: Callable[[], Any], runs: int = 2) -> float:
    """Run ``forward`` ``runs`` times (first run compiles); returns the seconds spent, for load-time reporting."""
    start = time.perf_counter()
    for _ in range(runs):
        forward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
