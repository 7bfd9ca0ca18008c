"""CacheConfig: one request's cache settings, derived from the user's CACHE_RATIO and the model yaml.

The model yaml's ``cache:`` section (``ModelParams.cache``) maps the single user knob ``cache_ratio`` in
[0, 1] onto the policy's parameters. Every numeric field is either a scalar or a list of knots spread
evenly over the ratio range: ``[a, b]`` means ``a`` as the ratio approaches 0 and ``b`` at ratio 1;
``[a, b, c]`` puts ``b`` at ratio 0.5; values are interpolated linearly and integers rounded. Ratio 0 is
always "no cache" (:meth:`CacheConfig.from_model_cache` returns ``None``: no hooks are installed).

Schema (see docs/cache.md for tuned values)::

    cache:
      policy: fbc                  # fbc | teacache
      forecast: none               # none | taylor1 | taylor2 (forecast of the skipped residual)
      threshold: [0.05, 0.35]      # non-decreasing in ratio
      warmup_steps: [3, 1]         # computed steps at the start, >= 1, non-increasing
      cooldown_steps: [2, 1]       # computed steps at the end, >= 1, non-increasing
      max_consecutive_skips: [1, 4]  # >= 1, non-decreasing
      rescale: [498.65, -283.78, 55.86, -3.82, 0.264]  # teacache only: np.polyval coefficients

Monotonicity of the knobs in the ratio is checked, so "more ratio -> more skipping" holds by
construction at the knob level (a higher threshold, a shorter warm-up, more consecutive skips).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["CacheConfig", "POLICIES", "FORECASTS", "validate_model_cache"]

POLICIES = ("fbc", "teacache")
FORECASTS = ("none", "taylor1", "taylor2")

# field -> (kind, direction the knots must follow as the ratio grows: +1 non-decreasing, -1 non-increasing)
_KNOBS: dict[str, tuple[type, int]] = {
    "threshold": (float, +1),
    "warmup_steps": (int, -1),
    "cooldown_steps": (int, -1),
    "max_consecutive_skips": (int, +1),
}
_DEFAULTS: dict[str, Any] = {"warmup_steps": 1, "cooldown_steps": 1, "max_consecutive_skips": 1}
_KNOWN_KEYS = frozenset({"policy", "forecast", "rescale", *_KNOBS})


@dataclass(frozen=True)
class CacheConfig:
    """Settings of one request's between-step cache (``None`` everywhere means "no cache")."""

    policy: str  # "fbc" (first-block residual) | "teacache" (modulated-input change)
    threshold: float  # skip while the (accumulated) relative L1 change stays below it
    warmup_steps: int = 1  # steps [0, warmup) are always computed (>= 1: step 0 always is)
    cooldown_steps: int = 1  # steps [total - cooldown, total) are always computed (>= 1: the last always is)
    max_consecutive_skips: int = 1  # after this many skips in a row a branch computes
    forecast: str = "none"  # "taylor1"/"taylor2": extrapolate the cached residual over skipped steps
    rescale: tuple[float, ...] | None = None  # teacache: np.polyval coefficients applied to the raw change
    ratio: float = 1.0  # the user's CACHE_RATIO this came from (reported in STATS)
    sync_ranks: bool = True  # pass the metric through the session's reduce (agreement across ranks), when it has one
    schedule: str | None = None  # benchmarks: replay a fixed "C"/"S" pattern (per forward) instead of deciding

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is not one of {POLICIES}")
        if self.forecast not in FORECASTS:
            raise ValueError(f"cache forecast {self.forecast!r} is not one of {FORECASTS}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"cache threshold must be finite, got {self.threshold}")
        for name in ("warmup_steps", "cooldown_steps", "max_consecutive_skips"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"cache {name} must be >= 1, got {getattr(self, name)}")
        if self.schedule is not None and set(self.schedule) - {"C", "S"}:
            raise ValueError(f"cache schedule must be a string of 'C' (compute) / 'S' (skip), got {self.schedule!r}")

    @property
    def history(self) -> int:
        """Computed residuals kept for the forecast (1 = plain reuse)."""
        return {"none": 1, "taylor1": 2, "taylor2": 3}[self.forecast]

    def with_(self, **changes: Any) -> "CacheConfig":
        return replace(self, **changes)

    @classmethod
    def from_model_cache(cls, model_cache: Mapping[str, Any] | None, ratio: float) -> "CacheConfig | None":
        """The config for ``ratio`` under a model yaml's ``cache:`` section; ``None`` = no cache.

        ``None`` when ``ratio == 0`` (the bit-exact uncached path) or the model has no ``cache:`` section
        (callers report that in STATS rather than ignoring the knob silently). Raises ``ValueError`` for a
        ratio outside [0, 1] and :class:`~smart_diffusion_backend.params.ConfigError` for a bad section.
        """
        ratio = float(ratio)
        if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
            raise ValueError(f"cache_ratio {ratio} is outside [0, 1]")
        if ratio == 0.0 or not model_cache:
            return None
        section = dict(model_cache)
        _check_section(section)
        values: dict[str, Any] = {}
        for name, (kind, _direction) in _KNOBS.items():
            knots = _knots(name, section.get(name, _DEFAULTS.get(name)))
            value = float(np.interp(ratio, np.linspace(0.0, 1.0, len(knots)), knots))
            values[name] = int(math.floor(value + 0.5)) if kind is int else value
        rescale = section.get("rescale")
        try:
            return cls(
                policy=str(section["policy"]),
                forecast=str(section.get("forecast", "none")),
                rescale=tuple(float(c) for c in rescale) if rescale else None,
                ratio=ratio,
                **values,
            )
        except ValueError as exc:
            raise ConfigError(f"model cache section: {exc}") from exc


def _knots(name: str, raw: Any) -> list[float]:
    if raw is None:
        raise ConfigError(f"model cache section: '{name}' is required")
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [float(raw)]
    if isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) >= 1:
        try:
            knots = [float(v) for v in raw]
        except (TypeError, ValueError):
            raise ConfigError(f"model cache section: '{name}' must be a number or a list of numbers, got {raw!r}") from None
        if all(math.isfinite(v) for v in knots):
            return knots
    raise ConfigError(f"model cache section: '{name}' must be a number or a list of finite numbers, got {raw!r}")


def _check_section(section: Mapping[str, Any]) -> None:
    unknown = sorted(set(section) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"model cache section: unknown keys {unknown}; known: {sorted(_KNOWN_KEYS)}")
    if section.get("policy") not in POLICIES:
        raise ConfigError(f"model cache section: policy must be one of {POLICIES}, got {section.get('policy')!r}")
    if section.get("forecast", "none") not in FORECASTS:
        raise ConfigError(f"model cache section: forecast must be one of {FORECASTS}, got {section.get('forecast')!r}")
    for name, (_kind, direction) in _KNOBS.items():
        knots = _knots(name, section.get(name, _DEFAULTS.get(name)))
        steps = np.diff(knots) * direction
        if (steps < 0).any():
            trend = "non-decreasing" if direction > 0 else "non-increasing"
            raise ConfigError(
                f"model cache section: '{name}' knots {knots} must be {trend} in the ratio "
                "(more ratio must never mean less skipping)"
            )
        if name != "threshold" and min(knots) < 1:
            raise ConfigError(f"model cache section: '{name}' must be >= 1 everywhere, got {knots}")
    rescale = section.get("rescale")
    if rescale is not None:
        if section["policy"] != "teacache":
            raise ConfigError("model cache section: 'rescale' only applies to policy teacache")
        _knots("rescale", rescale)


def validate_model_cache(model_cache: Mapping[str, Any] | None) -> None:
    """Check a model yaml's ``cache:`` section at load time (raises ConfigError); empty is valid (no cache)."""
    if model_cache:
        _check_section(dict(model_cache))
        for ratio in (0.25, 0.5, 1.0):
            CacheConfig.from_model_cache(model_cache, ratio)
