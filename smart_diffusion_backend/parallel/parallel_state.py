"""Process groups of the sequence-parallel / CFG-parallel denoiser (one module owns them, vLLM-style).

Layout
------
``world_size = cfg_degree * ring_degree * ulysses_degree``. A global rank decomposes as

    rank = (cfg_rank * ring_degree + ring_rank) * ulysses_degree + ulysses_rank

so Ulysses groups are runs of consecutive ranks (the all-to-all stays inside one NVLink island on big
hosts), ring groups stride over Ulysses groups, and the two CFG halves are the two contiguous halves of
the world. The sequence-parallel (SP) group of a CFG half holds ``ring_degree * ulysses_degree`` ranks and
its rank is ``sp_rank = ring_rank * ulysses_degree + ulysses_rank``: the joint sequence is cut into
``sp_world_size`` contiguous chunks and chunk ``sp_rank`` lives on that rank.

Lifecycle
---------
1. ``init_parallel_state(rank=..., world_size=..., init_method=..., backend=..., ulysses_degree=...,
   ring_degree=..., cfg_degree=..., timeout_s=...)`` once per process: creates the default process group
   (``backend``: "nccl" on GPUs, "gloo" on CPU), the data groups (SP, Ulysses, ring, CFG) on that backend
   and a gloo *control* group over the whole world for barriers and small decisions, even when the data
   goes over NCCL.
2. Getters (``get_sp_group()`` ...) return a :class:`GroupInfo`; they raise ``RuntimeError`` when the
   state is not initialised.
3. ``set_parallel_degrees(...)`` rebuilds only the data groups for another layout on the same world
   (tests and benchmarks switch between Ulysses / ring / hybrid without respawning processes).
4. ``destroy_parallel_state()`` destroys every group and the default process group; safe to call twice.

Every rank must call 1, 3 and 4 in the same order: ``new_group`` is itself a collective.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "GroupInfo",
    "ParallelConfig",
    "init_parallel_state",
    "set_parallel_degrees",
    "destroy_parallel_state",
    "is_initialized",
    "get_parallel_config",
    "get_world_group",
    "get_control_group",
    "get_sp_group",
    "get_ulysses_group",
    "get_ring_group",
    "get_cfg_group",
    "get_sp_rank",
    "get_sp_world_size",
    "get_ulysses_rank",
    "get_ulysses_world_size",
    "get_ring_rank",
    "get_ring_world_size",
    "get_cfg_rank",
    "get_cfg_world_size",
    "barrier",
    "broadcast_decision",
    "all_reduce_max",
    "all_reduce_any",
]


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the parallel layout; ``world_size`` is their product."""

    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses_degree", "ring_degree", "cfg_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be an integer >= 1, got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise ValueError(f"ParallelConfig.cfg_degree must be 1 or 2 (cond/uncond), got {self.cfg_degree}")

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.sp_degree


@dataclass(frozen=True)
class GroupInfo:
    """One process group as seen from this rank."""

    name: str
    group: Any  # torch.distributed.ProcessGroup
    ranks: tuple[int, ...]  # global ranks, in group-rank order
    rank_in_group: int

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    def global_rank(self, rank_in_group: int) -> int:
        return self.ranks[rank_in_group % len(self.ranks)]


@dataclass
class _State:
    rank: int
    world_size: int
    backend: str
    device: torch.device
    config: ParallelConfig
    world: GroupInfo
    control: GroupInfo
    owns_control: bool
    groups: dict[str, GroupInfo] = field(default_factory=dict)
    extra_groups: list[Any] = field(default_factory=list)  # every group created, destroyed at the end


_STATE: _State | None = None


def _require_state() -> _State:
    if _STATE is None:
        raise RuntimeError(
            "parallel state is not initialised: call "
            "smart_diffusion_backend.parallel.parallel_state.init_parallel_state(...) in this process first "
            "(the WorkerPool does it in every worker before worker_init)"
        )
    return _STATE


def is_initialized() -> bool:
    return _STATE is not None


def _layout(config: ParallelConfig) -> dict[str, list[list[int]]]:
    """All groups of each kind, as lists of global ranks (identical on every rank)."""
    u, r, c = config.ulysses_degree, config.ring_degree, config.cfg_degree

    def g(ci: int, ri: int, ui: int) -> int:
        return (ci * r + ri) * u + ui

    return {
        "ulysses": [[g(ci, ri, ui) for ui in range(u)] for ci in range(c) for ri in range(r)],
        "ring": [[g(ci, ri, ui) for ri in range(r)] for ci in range(c) for ui in range(u)],
        "sp": [[g(ci, ri, ui) for ri in range(r) for ui in range(u)] for ci in range(c)],
        "cfg": [[g(ci, ri, ui) for ci in range(c)] for ri in range(r) for ui in range(u)],
    }


def _build_data_groups(state: _State, config: ParallelConfig) -> None:
    if config.world_size != state.world_size:
        raise ValueError(
            f"cfg_degree({config.cfg_degree}) x ring_degree({config.ring_degree}) x "
            f"ulysses_degree({config.ulysses_degree}) = {config.world_size} != world_size {state.world_size}"
        )
    groups: dict[str, GroupInfo] = {}
    for name, all_ranks in _layout(config).items():
        for ranks in all_ranks:
            # new_group is collective over the world: every rank creates every group, keeps its own.
            if len(ranks) == state.world_size:
                pg = state.world.group
            else:
                pg = dist.new_group(ranks=ranks)
                state.extra_groups.append(pg)
            if state.rank in ranks:
                groups[name] = GroupInfo(name, pg, tuple(ranks), ranks.index(state.rank))
    state.groups = groups
    state.config = config


def init_parallel_state(
    *,
    rank: int,
    world_size: int,
    init_method: str,
    backend: str = "gloo",
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    cfg_degree: int = 1,
    timeout_s: float = 300.0,
    device: str | torch.device | None = None,
) -> ParallelConfig:
    """Join the default process group and build every group of the layout (see the module docstring).

    ``timeout_s`` bounds every collective (gloo raises after it; NCCL needs the watchdog / blocking wait).
    """
    global _STATE
    if _STATE is not None:
        raise RuntimeError("parallel state is already initialised in this process; call destroy_parallel_state() first")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    config = ParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_degree=cfg_degree)
    if config.world_size != world_size:
        raise ValueError(
            f"cfg_degree({cfg_degree}) x ring_degree({ring_degree}) x ulysses_degree({ulysses_degree}) = "
            f"{config.world_size} != world_size {world_size}"
        )
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    device = torch.device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised outside parallel_state; refusing to reuse it")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init: a broken GPU fails at start-up, not at the first step
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    world_pg = dist.group.WORLD
    world = GroupInfo("world", world_pg, tuple(range(world_size)), rank)
    try:
        if backend == "gloo":
            control, owns = world, False
        else:
            # Barriers and decisions on CPU: they never queue behind GPU work and never need a device sync.
            control_pg = dist.new_group(ranks=list(range(world_size)), backend="gloo", timeout=timeout)
            control, owns = GroupInfo("control", control_pg, tuple(range(world_size)), rank), True
        state = _State(rank, world_size, backend, device, config, world, control, owns)
        _build_data_groups(state, config)
    except BaseException:
        dist.destroy_process_group()
        raise
    _STATE = state
    return config


def set_parallel_degrees(*, ulysses_degree: int = 1, ring_degree: int = 1, cfg_degree: int = 1) -> ParallelConfig:
    """Rebuild the data groups for another layout of the same world (collective: all ranks, same order)."""
    state = _require_state()
    config = ParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree, cfg_degree=cfg_degree)
    if config == state.config:
        return config
    old = state.extra_groups
    state.extra_groups = []
    _build_data_groups(state, config)
    for pg in old:
        dist.destroy_process_group(pg)
    return config


def destroy_parallel_state() -> None:
    """Destroy all groups and the default process group. Idempotent."""
    global _STATE
    state, _STATE = _STATE, None
    if state is None:
        return
    if dist.is_initialized():
        # Destroying the default group destroys every subgroup with it.
        dist.destroy_process_group()


# ---- getters -------------------------------------------------------------------------------------


def get_parallel_config() -> ParallelConfig:
    return _require_state().config


def get_device() -> torch.device:
    return _require_state().device


def get_backend() -> str:
    return _require_state().backend


def get_world_group() -> GroupInfo:
    return _require_state().world


def get_control_group() -> GroupInfo:
    return _require_state().control


def _group(name: str) -> GroupInfo:
    return _require_state().groups[name]


def get_sp_group() -> GroupInfo:
    return _group("sp")


def get_ulysses_group() -> GroupInfo:
    return _group("ulysses")


def get_ring_group() -> GroupInfo:
    return _group("ring")


def get_cfg_group() -> GroupInfo:
    return _group("cfg")


def get_sp_rank() -> int:
    return get_sp_group().rank_in_group


def get_sp_world_size() -> int:
    return get_sp_group().world_size


def get_ulysses_rank() -> int:
    return get_ulysses_group().rank_in_group


def get_ulysses_world_size() -> int:
    return get_ulysses_group().world_size


def get_ring_rank() -> int:
    return get_ring_group().rank_in_group


def get_ring_world_size() -> int:
    return get_ring_group().world_size


def get_cfg_rank() -> int:
    return get_cfg_group().rank_in_group


def get_cfg_world_size() -> int:
    return get_cfg_group().world_size


# ---- decisions on the control group ------------------------------------------------------------------
# Under SP every rank must take the same branch before the next collective (cache skip, early stop,
# cancellation); these helpers make one rank's decision, or the max over ranks, everyone's.


def barrier() -> None:
    dist.barrier(group=get_control_group().group)


def broadcast_decision(value: Any, src: int = 0) -> Any:
    """Return global rank ``src``'s ``value`` on every rank (any picklable object)."""
    control = get_control_group()
    if control.world_size == 1:
        return value
    if src not in control.ranks:
        raise ValueError(f"broadcast_decision: src rank {src} is not in the world {control.ranks}")
    payload = [value if control.rank_in_group == control.ranks.index(src) else None]
    dist.broadcast_object_list(payload, src=src, group=control.group)
    return payload[0]


def all_reduce_max(value: float | int | bool | torch.Tensor) -> Any:
    """Element-wise max over all ranks; scalars come back as Python scalars of the same kind."""
    control = get_control_group()
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu", copy=True)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if control.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control.group)
        return t.to(device=value.device, dtype=value.dtype)
    if isinstance(value, bool):
        t = torch.tensor([int(value)], dtype=torch.int64)
    elif isinstance(value, int):
        t = torch.tensor([value], dtype=torch.int64)
    elif isinstance(value, float):
        t = torch.tensor([value], dtype=torch.float64)
    else:
        raise TypeError(f"all_reduce_max takes a bool, int, float or tensor, got {type(value).__name__}")
    if control.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control.group)
    out = t.item()
    return bool(out) if isinstance(value, bool) else type(value)(out)


def all_reduce_any(flag: bool) -> bool:
    """True on every rank if any rank passed True."""
    return bool(all_reduce_max(bool(flag)))
