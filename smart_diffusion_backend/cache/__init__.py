"""Between-step feature cache of a family's transformer, driven by one per-request knob.

    from smart_diffusion_backend.cache import CacheConfig, request_cache

    config = CacheConfig.from_model_cache(model_params.cache, user_params.cache_ratio)  # None at ratio 0
    with request_cache(transformer, config, total_steps) as cache:
        for i, t in enumerate(timesteps):
            cache.step(i)
            with cache.branch("cond"):
                ...transformer(...)
    stats.update(cache.stats())

The family's denoiser opens the session through ``DenoiserStage.open_cache``, which passes the family (the
blocks to hook) and the ranks' ``reduce``. See docs/cache.md for the policies, the model-yaml schema and
how to add a policy.
"""

from .config import FORECASTS, POLICIES, CacheConfig, validate_model_cache
from .hooks import BLOCK_HOOK, HEAD_HOOK, TAIL_HOOK, CacheHookSet
from .session import BranchState, CacheSession, MetricReduce, NoCacheSession, request_cache

__all__ = [
    "CacheConfig",
    "CacheHookSet",
    "CacheSession",
    "NoCacheSession",
    "BranchState",
    "MetricReduce",
    "request_cache",
    "validate_model_cache",
    "POLICIES",
    "FORECASTS",
    "HEAD_HOOK",
    "BLOCK_HOOK",
    "TAIL_HOOK",
]
