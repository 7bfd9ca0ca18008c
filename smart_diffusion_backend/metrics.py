"""Prometheus metrics of the pipeline, through Triton's custom metrics API (served on the metrics port).

No Triton import: model.py passes `triton_python_backend_utils` in as `pb`, as with triton_adapter.
Every Triton model instance is its own process, so each series carries `model`, `version` and
`instance` labels (instances never share a series; sum over `instance` in queries).

| metric | kind | labels | fed by |
|---|---|---|---|
| smart_diffusion_stage_seconds | histogram | stage | each stage model's execute, `pipeline` = orchestrator end to end |
| smart_diffusion_requests_total | counter | outcome: success, invalid_arg, cancelled, unavailable, error | every model |
| smart_diffusion_requests_in_flight | gauge | | orchestrators, denoiser |
| smart_diffusion_requests_waiting | gauge | | orchestrators: requests in the admission's queue |
| smart_diffusion_denoise_steps_total | counter | | denoiser |
| smart_diffusion_denoise_seconds_total | counter | | denoiser (steps/s = rate(steps) / rate(seconds)) |
| smart_diffusion_denoise_steps_per_second | gauge | | denoiser, last request |
| smart_diffusion_cache_steps_skipped_total | counter | | denoiser (STATS.cache) |
| smart_diffusion_cache_block_evals_total | counter | | denoiser (STATS.cache) |
| smart_diffusion_pool_restarts_total | counter | | denoiser's worker pool respawns |

Queue depth: the orchestrators queue in their own admission (`requests_waiting`); the ensemble's gate and
the stages queue in Triton (`nv_inference_pending_request_count{model=...}`).

Lifecycle: create in initialize(), `close()` in finalize(); the backend wants Metric objects deleted
before their MetricFamily (a hot upgrade unloads a version while another keeps serving).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

PREFIX = "smart_diffusion_"
# Seconds: tiny CPU models take milliseconds, real FLUX steps on a GPU take seconds.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
OUTCOMES = ("success", "invalid_arg", "cancelled", "unavailable", "error")

_FAMILIES: dict[str, tuple[str, str]] = {  # name -> (kind, help)
    "stage_seconds": ("HISTOGRAM", "Latency of one pipeline stage per request (stage=pipeline: end to end)"),
    "requests_total": ("COUNTER", "Requests answered, by outcome"),
    "requests_in_flight": ("GAUGE", "Requests this instance is working on (orchestrators, denoiser)"),
    "requests_waiting": ("GAUGE", "Requests waiting in this entry model's admission queue"),
    "denoise_steps_total": ("COUNTER", "Denoising steps run"),
    "denoise_seconds_total": ("COUNTER", "Seconds spent in denoise loops"),
    "denoise_steps_per_second": ("GAUGE", "Denoising steps per second of the last request"),
    "cache_steps_skipped_total": ("COUNTER", "Denoising steps whose transformer blocks the feature cache skipped"),
    "cache_block_evals_total": ("COUNTER", "Transformer block evaluations actually computed"),
    "pool_restarts_total": ("COUNTER", "Worker-pool respawns after a failed or dead worker"),
}


def outcome_of(error: Any, pb: Any) -> str:
    """A TritonError (or None) -> the `outcome` label."""
    if error is None:
        return "success"
    code = error.code() if hasattr(error, "code") else None
    codes = pb.TritonError
    names = {
        getattr(codes, "INVALID_ARG", None): "invalid_arg",
        getattr(codes, "CANCELLED", None): "cancelled",
        getattr(codes, "UNAVAILABLE", None): "unavailable",
    }
    return names.get(code, "error")


class ServingMetrics:
    """The metrics one Triton model instance reports; cheap no-ops if the API is missing."""

    def __init__(self, pb: Any, args: Mapping[str, str], model_name: str) -> None:
        self.pb = pb
        self.labels = {
            "model": model_name,
            "version": str(args.get("model_version", "")),
            "instance": str(args.get("model_instance_name", "")),
        }
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple, Any] = {}
        self.enabled = hasattr(pb, "MetricFamily")

    def _metric(self, name: str, **labels: str) -> Any:
        key = (name, *sorted(labels.items()))
        metric = self._metrics.get(key)
        if metric is None:
            family = self._families.get(name)
            kind, help_text = _FAMILIES[name]
            if family is None:
                family = self.pb.MetricFamily(
                    name=PREFIX + name, description=help_text, kind=getattr(self.pb.MetricFamily, kind)
                )
                self._families[name] = family
            extra = {"buckets": LATENCY_BUCKETS} if kind == "HISTOGRAM" else {}
            metric = family.Metric(labels={**self.labels, **labels}, **extra)
            self._metrics[key] = metric
        return metric

    # -- recording ---------------------------------------------------------------------------

    def observe_stage(self, stage: str, seconds: float) -> None:
        if self.enabled:
            self._metric("stage_seconds", stage=stage).observe(seconds)

    def count_request(self, outcome: str) -> None:
        if self.enabled:
            self._metric("requests_total", outcome=outcome).increment(1)

    def count_responses(self, responses: list) -> None:
        for response in responses:
            self.count_request(outcome_of(response.error() if response.has_error() else None, self.pb))

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        gauge = self._metric("requests_in_flight") if self.enabled else None
        if gauge is not None:
            gauge.increment(1)
        try:
            yield
        finally:
            if gauge is not None:
                gauge.increment(-1)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - started)

    def observe_denoise(self, stats: Mapping[str, Any]) -> None:
        """From the denoiser's STATS: steps, the denoise time and the cache counters."""
        if not self.enabled:
            return
        steps = int(stats.get("steps", 0))
        seconds = float(stats.get("stages_ms", {}).get("denoiser", 0.0)) / 1000.0
        self._metric("denoise_steps_total").increment(steps)
        self._metric("denoise_seconds_total").increment(seconds)
        if seconds > 0:
            self._metric("denoise_steps_per_second").set(steps / seconds)
        cache = stats.get("cache") or {}
        self._metric("cache_steps_skipped_total").increment(int(cache.get("cache_steps_skipped", 0)))
        self._metric("cache_block_evals_total").increment(int(cache.get("cache_block_evals", 0)))

    def set_waiting(self, count: int) -> None:
        if self.enabled:
            self._metric("requests_waiting").set(count)

    def set_pool_restarts(self, total: int) -> None:
        """Raise the counter to `total` (the pool counts its own restarts)."""
        if not self.enabled:
            return
        counter = self._metric("pool_restarts_total")
        delta = total - counter.value()
        if delta > 0:
            counter.increment(delta)

    def close(self) -> None:
        """Metrics first, then families (the backend's required order)."""
        self._metrics.clear()
        self._families.clear()


# ------------------------------------------------------------------------------------------------
# Reading them back (tests, soak, upgrade scripts): Prometheus text format from the metrics port
# ------------------------------------------------------------------------------------------------

Sample = tuple[str, frozenset]  # (metric name, frozenset of (label, value))


def parse_prometheus(text: str) -> dict[Sample, float]:
    samples: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = []
        for part in labels.rstrip("}").split('",') if labels else []:
            key, _, val = part.partition("=")
            pairs.append((key.strip(), val.strip().strip('"')))
        try:
            samples[(name, frozenset(pairs))] = float(value)
        except ValueError:
            continue
    return samples


def scrape(host: str, port: int, timeout_s: float = 10.0) -> dict[Sample, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as reply:
        return parse_prometheus(reply.read().decode())


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of every series of `name` whose labels include `labels` (e.g. over instances)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
