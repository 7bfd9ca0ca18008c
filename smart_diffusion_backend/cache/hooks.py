"""Named, stateful block hooks of the between-step cache (diffusers ``HookRegistry`` / ``ModelHook`` style).

One :class:`CacheHookSet` per transformer object, shared by the sessions open on it (reference-counted):
installed when the first :class:`~.session.CacheSession` opens, removed — blocks restored exactly as they
were — when the last one closes. The hooks hold no request state: each forward looks up the active
session and branch (a ``ContextVar`` set by ``request_cache`` / ``session.branch``) and runs that branch's
state machine (:class:`~.session.BranchState`). A forward with no active cached session — another request
with ratio 0, or none at all — calls the original block forwards untouched.

Per forward of the block stack ``blocks[0] .. blocks[n-1]``:

* head hook on ``blocks[0]`` takes the decision (policy "teacache" before running it, "fbc" after) and, on
  a skip, returns the stack's output rebuilt from the cached residual (``state.skipping = True``);
* block hooks on ``blocks[1:]`` pass their inputs through while skipping, run the block otherwise;
* the tail hook (``blocks[n-1]``) records the residual of a computed forward and ends the forward.

Which blocks form the stack, and how a block takes and returns its streams, is the model family's to say
(``Family.block_stacks`` and ``Family.cache_points``, families/spec.py): the hooks ask the family they were
given, or the one that registers the transformer's class.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

if TYPE_CHECKING:
    from .session import BranchState

__all__ = ["CacheHookSet", "DiffusersContext", "HEAD_HOOK", "BLOCK_HOOK", "TAIL_HOOK", "StackFamily", "family_for",
           "relative_l1"]

HEAD_HOOK = "smart_diffusion_cache_head"
BLOCK_HOOK = "smart_diffusion_cache_block"
TAIL_HOOK = "smart_diffusion_cache_tail"
_ATTR = "_smart_diffusion_cache_hookset"

# Stack of (session, branch name or None) entries of the code running now, innermost last; pushed by
# request_cache / session.branch. A forward uses the innermost entry whose session targets its transformer.
_ACTIVE: contextvars.ContextVar[tuple[tuple[Any, str | None], ...]] = contextvars.ContextVar("sd_cache_active", default=())
# Branch state of the stack forward in progress: set by the head hook, cleared by the tail hook.
_CURRENT: contextvars.ContextVar["BranchState | None"] = contextvars.ContextVar("sd_cache_current", default=None)


class _NoState(BaseState):
    def reset(self) -> None:
        pass


class DiffusersContext(StateManager):
    """Receives diffusers' ``transformer.cache_context(name, step_index=...)``: branch name and step of a call.

    ``_set_cache_context`` hands the context to every ``StateManager`` attribute of a stateful hook; the
    cache state itself lives in the session, so this one only keeps the context.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)

    @property
    def current(self) -> CacheContext | None:
        return self._context


def relative_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """sum|x - ref| / sum|ref| in float32 (0.0 for an empty local shard: the other ranks decide)."""
    num = torch.sum((x - ref).abs(), dtype=torch.float32)
    den = torch.sum(ref.abs(), dtype=torch.float32)
    num_v, den_v = torch.stack((num, den)).tolist()  # one device sync per decision
    return num_v / den_v if den_v > 0 else 0.0


def _unwrap(transformer: torch.nn.Module) -> torch.nn.Module:
    return getattr(transformer, "_orig_mod", transformer)  # torch.compile's OptimizedModule


class StackFamily(Protocol):
    """What the cache asks a model family (``families.spec.Family`` provides it)."""

    cache_points: Any  # inputs / outputs / pack / modulated_input of a block (families.spec.CachePoints)

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]: ...


def family_for(transformer: torch.nn.Module, family: StackFamily | None) -> StackFamily:
    """``family`` as given, else the family that registers the transformer's class. The lookup runs at call
    time in the torch-free family registry: importing the cache imports nothing of the families."""
    if family is not None:
        return family
    from ..families import family_of

    try:
        return family_of(transformer)
    except ValueError as exc:
        raise ValueError(f"feature cache: {exc}") from None


class _Stack:
    """The hooked blocks of one transformer in call order, and its family's view of a block's streams."""

    def __init__(self, transformer: torch.nn.Module, family: StackFamily):
        points = family.cache_points
        self.blocks = family.blocks(transformer)
        self.inputs, self.outputs, self.pack = points.inputs, points.outputs, points.pack
        self.modulated_input = points.modulated_input
        if len(self.blocks) < 2:
            raise ValueError(f"feature cache: {type(transformer).__name__} has {len(self.blocks)} block(s); need >= 2")


class CacheHeadHook(ModelHook):
    """On ``blocks[0]``: the skip decision of the active branch."""

    _is_stateful = True

    def __init__(self, hookset: "CacheHookSet"):
        super().__init__()
        self.hookset = hookset
        self.diffusers_context = DiffusersContext()  # set by transformer.cache_context(...)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.hookset.begin_forward(self.diffusers_context.current)
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return state.head_forward(self.fn_ref.original_forward, module, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.hookset.reset_sessions()
        return module


class CacheBlockHook(ModelHook):
    """On ``blocks[1:]``: pass through while the head decided to skip; the tail records the residual."""

    _is_stateful = False  # reads the branch state the head hook selected; holds none itself

    def __init__(self, hookset: "CacheHookSet", is_tail: bool):
        super().__init__()
        self.hookset = hookset
        self.is_tail = is_tail

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = _CURRENT.get()
        if state is None or state.hookset is not self.hookset:
            return self.fn_ref.original_forward(*args, **kwargs)
        if state.skipping:
            output = self.hookset.stack.pack(*self.hookset.stack.inputs(args, kwargs))
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                state.tail_computed(output)
        if self.is_tail:
            _CURRENT.set(None)
        return output


class CacheHookSet:
    """The hooks on one transformer's blocks, shared by the sessions open on it."""

    def __init__(self, transformer: torch.nn.Module, family: StackFamily):
        self.transformer = _unwrap(transformer)
        self.stack = _Stack(self.transformer, family)
        self.n_blocks = len(self.stack.blocks)
        self._refs = 0
        self._sessions: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._installed: list[tuple[torch.nn.Module, str, bool, bool]] = []

    # ---- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, transformer: torch.nn.Module, session: Any, family: StackFamily) -> "CacheHookSet":
        module = _unwrap(transformer)
        hookset = module.__dict__.get(_ATTR)
        if hookset is None:
            hookset = cls(module, family)
            hookset._install()
            object.__setattr__(module, _ATTR, hookset)
        hookset._refs += 1
        hookset._sessions.add(session)
        return hookset

    def release(self, session: Any) -> None:
        self._sessions.discard(session)
        self._refs -= 1
        if self._refs <= 0:
            self._remove()
            self.transformer.__dict__.pop(_ATTR, None)

    def _install(self) -> None:
        last = self.n_blocks - 1
        try:
            for index, block in enumerate(self.stack.blocks):
                had_registry = hasattr(block, "_diffusers_hook")
                had_forward = "forward" in block.__dict__
                if index == 0:
                    hook, name = CacheHeadHook(self), HEAD_HOOK
                else:
                    hook, name = CacheBlockHook(self, is_tail=index == last), (TAIL_HOOK if index == last else BLOCK_HOOK)
                HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, name)
                self._installed.append((block, name, had_registry, had_forward))
        except BaseException:
            self._remove()
            raise
        finally:
            _invalidate_registry_caches(self.transformer)

    def _remove(self) -> None:
        while self._installed:
            block, name, had_registry, had_forward = self._installed.pop()
            registry = block._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                if not had_forward:
                    block.__dict__.pop("forward", None)  # back to the class's forward
                if not had_registry:
                    del block._diffusers_hook
        _invalidate_registry_caches(self.transformer)

    @staticmethod
    def installed_on(transformer: torch.nn.Module) -> bool:
        """Whether any cache hook is on ``transformer``'s blocks (tests check cleanup with it)."""
        module = _unwrap(transformer)
        if _ATTR in module.__dict__:
            return True
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is not None and {HEAD_HOOK, BLOCK_HOOK, TAIL_HOOK} & set(registry.hooks):
                return True
        return False

    # ---- per forward ----------------------------------------------------------------------------
    def begin_forward(self, context: CacheContext | None = None) -> "BranchState | None":
        """The branch state this forward runs under, or None (plain forward)."""
        state = None
        for session, branch in reversed(_ACTIVE.get()):
            if session.target is not self.transformer:
                continue  # a session on another transformer (a second expert of the same stage, ...)
            if session.hookset is self:  # else a ratio-0 session: plain forward
                state = session.state_for(branch, context)
            break
        _CURRENT.set(state)
        return state

    def reset_sessions(self) -> None:
        for session in list(self._sessions):
            session.reset_state()


def _invalidate_registry_caches(module: torch.nn.Module) -> None:
    # diffusers caches each registry's list of child registries (used by cache_context); it goes stale
    # when block hooks come and go.
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None:
            registry._child_registries_cache = None


def push_active(session: Any, branch: str | None) -> contextvars.Token:
    return _ACTIVE.set(_ACTIVE.get() + ((session, branch),))


def reset_active(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)

