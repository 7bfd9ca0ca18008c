"""Per-request cache state: ``request_cache(transformer, config, total_steps)`` -> :class:`CacheSession`.

Lifecycle of one request::

    config = CacheConfig.from_model_cache(model.cache, params.cache_ratio)   # None for ratio 0
    with request_cache(transformer, config, total_steps=len(timesteps)) as cache:
        for i, t in enumerate(timesteps):
            cache.step(i)
            with cache.branch("cond"):
                noise_cond = transformer(...)
            with cache.branch("uncond"):            # CFG: each branch has its own state
                noise_uncond = transformer(...)
    stats.update(cache.stats())

Entering installs the hooks (shared, reference-counted per transformer) and creates the state; leaving
— also on an exception — drops every cached tensor and removes the hooks when no other session uses
them. ``config=None`` gives a session that installs nothing: the forward is the plain transformer's.

Inside ``with request_cache(...)`` a forward without ``branch()`` goes to this session: when ``step(i)``
is called, the k-th forward of a step is branch ``"call<k>"``; otherwise everything is one branch
``"default"`` whose k-th forward is step k. ``branch(name)`` also (re)activates its session, so calls
of two open sessions can be interleaved freely.

Ranks that each hold part of the sequence must take the same decision. Whoever runs the loop passes
``reduce``: a callable that makes one float the same on every rank (the sequence-parallel pool passes the
max over its ranks); without it, as in one process, each session decides on its own metric. Forced
decisions (warm-up, cool-down, max consecutive skips) depend only on the step index and on earlier
(already agreed) decisions, so ``reduce`` is not called for them.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from .config import CacheConfig
from .hooks import CacheHookSet, StackFamily, _unwrap, family_for, push_active, relative_l1, reset_active

__all__ = ["request_cache", "CacheSession", "NoCacheSession", "BranchState", "MetricReduce"]

# Makes a decision metric the same on every rank (e.g. the max over the ranks of a sequence-parallel group).
MetricReduce = Callable[[float], float]


def request_cache(
    transformer: torch.nn.Module,
    config: CacheConfig | None,
    total_steps: int,
    *,
    family: StackFamily | None = None,
    reduce: MetricReduce | None = None,
) -> "CacheSession | NoCacheSession":
    """A context manager with the cache state of one request (``config=None``: no cache, no hooks).

    ``family``: the transformer's model family, which says which blocks to hook and how they pass their
    streams (None: the family that registers the transformer's class). ``reduce``: how ranks that share
    this forward agree on a metric (None: this process decides alone)."""
    if int(total_steps) < 1:
        raise ValueError(f"request_cache: total_steps must be >= 1, got {total_steps}")
    family = family_for(transformer, family)
    if config is None:
        return NoCacheSession(transformer, int(total_steps), family)
    return CacheSession(transformer, config, int(total_steps), family, reduce=reduce)


class _Branch:
    """Context manager that makes (session, name) the target of the forwards inside it."""

    def __init__(self, session: Any, name: str | None):
        self.session, self.name = session, name

    def __enter__(self):
        self.token = push_active(self.session, self.name)
        if self.name is not None:
            self.session._forwards_by_branch.setdefault(self.name, 0)
            self.session._forwards_by_branch[self.name] += 1
        return self.session

    def __exit__(self, *exc) -> None:
        reset_active(self.token)


class _SessionBase:
    policy = "none"

    def __init__(self, transformer: torch.nn.Module, total_steps: int, family: StackFamily):
        self.transformer = transformer
        self.target = _unwrap(transformer)  # the module whose blocks carry the hooks
        self.family = family
        self.total_steps = total_steps
        self.hookset: CacheHookSet | None = None
        self._step: int | None = None
        self._steps_seen: set[int] = set()
        self._forwards_by_branch: dict[str, int] = {}
        self._token = None
        self._closed = False

    def step(self, index: int) -> None:
        """Tell the cache which denoising step the next forwards belong to (0-based)."""
        index = int(index)
        if not 0 <= index < self.total_steps:
            raise ValueError(f"cache step {index} is outside [0, total_steps={self.total_steps})")
        self._step = index
        self._steps_seen.add(index)
        self._ordinal = 0

    def branch(self, name: str) -> _Branch:
        """``with session.branch("cond"): transformer(...)``: the forwards inside use branch ``name``."""
        if not name:
            raise ValueError("cache branch name must be a non-empty string")
        return _Branch(self, str(name))

    def __enter__(self):
        self._open()
        self._token = push_active(self, None)
        return self

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            reset_active(self._token)
            self._token = None
        self._close()

    def _open(self) -> None: ...

    def _close(self) -> None:
        self._closed = True


class NoCacheSession(_SessionBase):
    """CACHE_RATIO 0 (or a model without a ``cache:`` section): no hooks, the plain transformer."""

    def __init__(self, transformer: torch.nn.Module, total_steps: int, family: StackFamily,
                 reason: str = "cache_ratio 0"):
        super().__init__(transformer, total_steps, family)
        self.reason = reason

    def state_for(self, branch: str | None, context: Any = None):  # never called: hookset is None
        raise RuntimeError("NoCacheSession has no cache state")

    def stats(self) -> dict[str, Any]:
        # No hooks: forwards are known only from step() / branch() calls (else one per step is assumed).
        n_blocks = len(self.family.blocks(self.target))
        steps = len(self._steps_seen) or self.total_steps
        forwards = sum(self._forwards_by_branch.values()) or steps
        return {
            "cache_ratio": 0.0,
            "cache_policy": "none",
            "cache_steps_total": steps,
            "cache_steps_computed": steps,
            "cache_steps_skipped": 0,
            "cache_forwards_computed": forwards,
            "cache_forwards_skipped": 0,
            "cache_block_evals": forwards * n_blocks,
            "cache_block_evals_total": forwards * n_blocks,
            "cache_block_eval_speedup": 1.0,
        }


class CacheSession(_SessionBase):
    """The cache state of one request: one :class:`BranchState` per CFG branch."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        config: CacheConfig,
        total_steps: int,
        family: StackFamily,
        reduce: MetricReduce | None = None,
    ):
        super().__init__(transformer, total_steps, family)
        self.config = config
        self.policy = config.policy
        self._branches: dict[str, BranchState] = {}
        self._ordinal = 0
        self._reduce = reduce if config.sync_ranks else None

    def _open(self) -> None:
        if self._closed:
            raise RuntimeError("a CacheSession is for one request: create a new one with request_cache(...)")
        self.hookset = CacheHookSet.acquire(self.transformer, self, self.family)

    def _close(self) -> None:
        try:
            for state in self._branches.values():
                state.drop_tensors()
            if self.hookset is not None:
                self.hookset.release(self)
        finally:
            self.hookset = None
            self._closed = True

    def reset_state(self) -> None:
        """Forget every branch (the hooks' ``reset_state``): the next forward starts from scratch."""
        self._branches.clear()

    # ---- called by the hooks --------------------------------------------------------------------
    def state_for(self, branch: str | None, context: Any = None) -> "BranchState":
        """Branch and step of the forward starting now: ``branch()`` / ``step()`` first, then diffusers'
        ``cache_context(name, step_index=...)``, then the implicit names ("call<k>" / "default")."""
        if branch is None and context is not None:
            branch = context.name
        if branch is None:
            if self._step is None:
                branch = "default"
            else:
                branch = f"call{self._ordinal}"
                self._ordinal += 1
        state = self._branches.get(branch)
        if state is None:
            state = self._branches[branch] = BranchState(self, branch)
        if self._step is not None:
            state.next_step = self._step
        elif context is not None and context.step_index is not None:
            state.next_step = int(context.step_index)
        else:
            state.next_step = state.forwards  # one forward per step
        return state

    def forced_compute(self, step: int) -> bool:
        cfg = self.config
        return step < cfg.warmup_steps or step >= self.total_steps - cfg.cooldown_steps

    def agree(self, metric: float) -> float:
        """The metric every rank decides on: ``reduce(metric)``, or the local metric without one."""
        return float(self._reduce(float(metric))) if self._reduce is not None else metric

    # ---- reporting ------------------------------------------------------------------------------
    def decisions(self, branch: str) -> str:
        """'C'/'S' per forward of ``branch`` (computed / skipped), in call order."""
        state = self._branches.get(branch)
        return "".join(d for _, d in state.decisions) if state else ""

    def stats(self) -> dict[str, Any]:
        """Counters for the request's STATS (valid after the session closed)."""
        n = self.hookset.n_blocks if self.hookset else len(self.family.blocks(self.target))
        by_step: dict[int, list[str]] = {}
        forwards = computed = blocks = 0
        for state in self._branches.values():
            for step, decision in state.decisions:
                by_step.setdefault(step, []).append(decision)
            forwards += len(state.decisions)
            computed += sum(d == "C" for _, d in state.decisions)
            blocks += state.blocks_computed
        skipped_steps = sum(all(d == "S" for d in ds) for ds in by_step.values())
        total_blocks = forwards * n
        cfg = self.config
        return {
            "cache_ratio": cfg.ratio,
            "cache_policy": cfg.policy + ("" if cfg.forecast == "none" else f"+{cfg.forecast}"),
            "cache_threshold": cfg.threshold,
            "cache_warmup_steps": cfg.warmup_steps,
            "cache_cooldown_steps": cfg.cooldown_steps,
            "cache_max_consecutive_skips": cfg.max_consecutive_skips,
            "cache_steps_total": len(by_step),
            "cache_steps_computed": len(by_step) - skipped_steps,
            "cache_steps_skipped": skipped_steps,
            "cache_forwards_computed": computed,
            "cache_forwards_skipped": forwards - computed,
            "cache_block_evals": blocks,
            "cache_block_evals_total": total_blocks,
            "cache_block_eval_speedup": round(total_blocks / blocks, 4) if blocks else 1.0,
            "cache_schedule": {name: self.decisions(name) for name in self._branches},
        }


class BranchState:
    """The state machine of one CFG branch of one request (see the policies in docs/cache.md)."""

    def __init__(self, session: CacheSession, name: str):
        self.session = session
        self.hookset = session.hookset
        self.name = name
        self.config = session.config
        self.skipping = False
        self.consecutive_skips = 0
        self.forwards = 0
        self.blocks_computed = 0
        self.decisions: list[tuple[int, str]] = []  # (step, "C" | "S")
        self.metrics: list[float | None] = []  # the (agreed) value compared with the threshold
        self._step = 0
        self.next_step = 0  # set by CacheSession.state_for before each forward
        # tensors (dropped at the end of the request)
        self.residuals: deque[tuple[int, torch.Tensor, torch.Tensor | None]] = deque(maxlen=self.config.history)
        self.stack_in: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.reference: torch.Tensor | None = None  # fbc: head residual of the last computed step
        self.previous_input: torch.Tensor | None = None  # teacache: last modulated input
        self.accumulated = 0.0  # teacache

    def drop_tensors(self) -> None:
        self.residuals.clear()
        self.stack_in = self.reference = self.previous_input = None

    # ---- the head hook ----------------------------------------------------------------------------
    def head_forward(self, original: Callable[..., Any], block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        session, cfg, stack = self.session, self.config, self.hookset.stack
        step = self._step = self.next_step
        forced = session.forced_compute(step) or self.consecutive_skips >= cfg.max_consecutive_skips or not self.residuals
        replay = None
        if cfg.schedule is not None:
            replay = self.forwards < len(cfg.schedule) and cfg.schedule[self.forwards] == "S"
        self.forwards += 1
        hidden_in, encoder_in = stack.inputs(args, kwargs)

        if cfg.policy == "teacache":
            modulated = stack.modulated_input(block, args, kwargs)
            change = None
            if self.previous_input is not None and self.previous_input.shape == modulated.shape:
                change = relative_l1(modulated, self.previous_input)
                if cfg.rescale is not None:
                    change = float(np.polyval(cfg.rescale, change))
            self.previous_input = modulated
            skip, metric = False, None
            if not forced and change is not None:
                if replay is None:
                    change = session.agree(change)
                    self.accumulated += change
                    metric = self.accumulated
                    skip = metric < cfg.threshold
                else:
                    skip = replay
            if skip:
                hidden_res, encoder_res = self._forecast(step)
                return self._skip(step, metric, 0, stack.pack(hidden_in + hidden_res, _add(encoder_in, encoder_res)))
            self.accumulated = 0.0
            self.stack_in = (hidden_in, encoder_in)
            return self._compute(step, metric, original(*args, **kwargs))

        # fbc: run the first block, compare its residual with the last computed step's
        output = original(*args, **kwargs)
        hidden_out, encoder_out = stack.outputs(output)
        head_residual = hidden_out - hidden_in
        skip, metric = False, None
        if not forced and self.reference is not None:
            if replay is None:
                metric = session.agree(relative_l1(head_residual, self.reference))
                skip = metric < cfg.threshold
            else:
                skip = replay
        if skip:
            hidden_res, encoder_res = self._forecast(step)
            return self._skip(step, metric, 1, stack.pack(hidden_out + hidden_res, _add(encoder_out, encoder_res)))
        self.reference = head_residual
        self.stack_in = (hidden_out, encoder_out)
        return self._compute(step, metric, output)

    def _skip(self, step: int, metric: float | None, blocks: int, output: Any) -> Any:
        self.skipping = True
        self.consecutive_skips += 1
        self.blocks_computed += blocks
        self.decisions.append((step, "S"))
        self.metrics.append(metric)
        return output

    def _compute(self, step: int, metric: float | None, output: Any) -> Any:
        self.skipping = False
        self.consecutive_skips = 0
        self.blocks_computed += 1 if self.config.policy == "fbc" else 0  # the rest counted by tail_computed
        self.decisions.append((step, "C"))
        self.metrics.append(metric)
        return output

    # ---- the tail hook ----------------------------------------------------------------------------
    def tail_computed(self, output: Any) -> None:
        hidden_out, encoder_out = self.hookset.stack.outputs(output)
        hidden_in, encoder_in = self.stack_in
        encoder_res = None if encoder_out is None or encoder_in is None else encoder_out - encoder_in
        self.residuals.append((self._step, hidden_out - hidden_in, encoder_res))
        self.stack_in = None
        head = 1 if self.config.policy == "fbc" else 0
        self.blocks_computed += self.hookset.n_blocks - head

    # ---- forecast of the skipped residual ---------------------------------------------------------
    def _forecast(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plain reuse of the last residual, or a Taylor (Newton) extrapolation in the step index."""
        history = list(self.residuals)
        if len(history) == 1 or self.config.forecast == "none":
            return history[-1][1], history[-1][2]
        return _newton(history, step, 1), _newton(history, step, 2)


def _add(x: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or residual is None else x + residual


def _newton(history: list[tuple[int, torch.Tensor, Any]], step: int, field: int) -> Any:
    """Newton-form polynomial through the kept (step, residual) points, evaluated at ``step``."""
    if history[-1][field] is None:
        return None
    xs = [float(h[0]) for h in history]
    coeffs = [h[field] for h in history]
    n = len(xs)
    # divided differences, newest point first so that the first order uses the last two points
    xs, coeffs = xs[::-1], coeffs[::-1]
    table = list(coeffs)
    for order in range(1, n):
        for i in range(n - 1, order - 1, -1):
            table[i] = (table[i] - table[i - 1]) / (xs[i] - xs[i - order])
    result = table[n - 1]
    for i in range(n - 2, -1, -1):
        result = result * (step - xs[i]) + table[i]
    return result

