"""Regional torch.compile of a transformer's repeated blocks (step speed).

diffusers 0.42 models declare ``_repeated_blocks`` (the class names of their transformer blocks); each such
block's forward is compiled in place. Blocks of one class share a compiled graph, so compile time is that
of one or two blocks, not the model. The system param ``compile_transformer: true`` does this at model load
(``DenoiserStage.compile_transformers``; in a pool, on every rank after its sequence-parallel processors
are in), with a warm-up so the first request does not pay the compile.

Call after ``install_attention``: the processors are traced into the block graphs (our Triton kernel is the
opaque custom op ``smart_diffusion::flash_attention`` there).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

__all__ = ["compile_repeated_blocks", "warm_up_compiled"]


def compile_repeated_blocks(transformer: torch.nn.Module, *, mode: str | None = None, fullgraph: bool = True,
                            dynamic: bool = False, **compile_kwargs: Any) -> int:
    """torch.compile the ``forward`` of each repeated block of ``transformer`` in place (lazy: compiles on
    the first call); returns how many blocks. Like diffusers' ``compile_repeated_blocks``, except that the
    block's forward is compiled rather than its ``__call__``: hooks that diffusers' HookRegistry wraps around
    a forward (the feature cache's) then stay outside the graph and run eagerly around the compiled block."""
    names = getattr(transformer, "_repeated_blocks", None)
    if not isinstance(transformer, torch.nn.Module) or not hasattr(transformer, "compile_repeated_blocks"):
        raise ValueError(f"compile_repeated_blocks: {type(transformer).__name__} is not a diffusers ModelMixin")
    if not names:
        raise ValueError(f"compile_repeated_blocks: {type(transformer).__name__} declares no _repeated_blocks")
    count = 0
    for module in transformer.modules():
        if type(module).__name__ in names:
            module.forward = torch.compile(module.forward, mode=mode, fullgraph=fullgraph, dynamic=dynamic,
                                           **compile_kwargs)
            count += 1
    if count == 0:
        raise ValueError(f"compile_repeated_blocks: no module of {list(names)} in {type(transformer).__name__}")
    return count


def warm_up_compiled(forward: Callable[[], Any], runs: int = 2) -> float:
    """Run ``forward`` ``runs`` times (first run compiles); returns the seconds spent, for load-time reporting."""
    start = time.perf_counter()
    for _ in range(runs):
        forward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
