"""The denoiser's worker pool: one process per rank, each holding the family's DenoiserStage with a
sequence-parallel transformer, running the same denoise loop in lockstep.

Every rank gets the same job (embeddings, the request's image conditioning, user params): noise comes from the seeded CPU generator, the
scheduler is built per request, so trajectories are identical on all ranks and rank 0's latents are
the answer. Rank 0 reports progress to the request's step channel; a cancel heard there is raised as a
pool-wide cancel flag, and all ranks stop together at the next step (a collective check).

LoRA: every worker loads the same resident adapters (the parent pins the list, so a respawned pool loads
them again) and each rank's stage applies the request's LORA / LORA_SCALE around its denoise; an adapter
that is not resident is refused in the parent, before the job reaches the ranks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from ..errors import DenoiseCancelled
from ..families import Embeddings, load_stage
from ..lora import check_selection, pin_resident, resident_names
from ..params import ModelParams, SystemParams, UserParams
from ..progress import StepReporter
from . import parallel_state as ps
from .parallel_state import ParallelConfig
from .transformer_sp import SPTransformerConfig, cfg_parallel, parallelize_transformer
from .worker_pool import JobCancelledError, WorkerContext, WorkerPool, WorkerPoolError

# The Embeddings fields that carry a request's image conditioning (docs/image-conditioning.md).
CONDITIONING_FIELDS = ("image_latents", "mask_latents", "image_embeds")


class DenoiseWorker:
    def __init__(self, ctx: WorkerContext, model: ModelParams, system: SystemParams) -> None:
        self.ctx = ctx
        self.model, self.system = model, system
        if system.torch_threads:
            torch.set_num_threads(system.torch_threads)
        # Loaded eager: the blocks are compiled below, once the parallel processors are in (compiling first
        # would trace the one-rank processors and recompile at the first request).
        self.stage = load_stage("denoiser", self.model, dataclasses.replace(system, compile_transformer=False))
        if ctx.parallel.sp_degree > 1:
            self.sp_handle = parallelize_transformer(
                self.stage.transformer,
                SPTransformerConfig(attention_backend=self.system.attention_backend),
                self.stage.family,
            )
            # Each rank's blocks see only its chunk of the sequence: cache decisions take the max over ranks,
            # so every rank skips (or computes) the same forwards and the collectives stay in step.
            self.stage.reduce_metric = ps.all_reduce_max
        if ctx.parallel.cfg_degree > 1:
            self.stage.run_branches = cfg_parallel
        if system.compile_transformer:
            self.stage.compile_transformers(fullgraph=False)  # every rank warms up together
        ctx.heartbeat()

    def compile_seconds(self) -> float | None:
        """This rank's compile + warm-up seconds (None when the blocks run eager)."""
        return self.stage.compile_seconds

    def lora_adapters(self) -> tuple[str, ...]:
        """The LoRA adapters resident on this rank."""
        return self.stage.lora_adapters

    def denoise(
        self,
        prompt_embeds: np.ndarray,
        pooled: np.ndarray,
        params: UserParams,
        channel: str | None,
        conditioning: dict[str, np.ndarray] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """`conditioning`: the request's image conditioning by Embeddings field (image_latents, mask_latents,
        image_embeds; those the request has), handed to the stage as the one-process path does."""
        embeddings = Embeddings(
            torch.from_numpy(prompt_embeds),
            torch.from_numpy(pooled),
            **{name: torch.from_numpy(value) for name, value in (conditioning or {}).items()},
        )
        reporter = StepReporter(channel) if channel and self.ctx.rank == 0 else None

        def on_step(step: int, total: int) -> None:
            if reporter is not None:
                try:
                    reporter(step, total)
                except DenoiseCancelled:
                    self.ctx.request_cancel()
            self.ctx.check_cancelled()  # collective: every rank stops at the same step

        stats: dict = {}
        try:
            latents = self.stage.denoise(embeddings, params, on_step=on_step, stats=stats)
            return latents.float().cpu(), stats
        finally:
            if reporter is not None:
                reporter.close()


def init_denoise_worker(ctx: WorkerContext, model: ModelParams, system: SystemParams) -> DenoiseWorker:
    return DenoiseWorker(ctx, model, system)


class PooledDenoiser:
    """The denoiser model's pool: spawned at load, a job per request, respawned after a failure."""

    def __init__(self, model: ModelParams, system: SystemParams, *, step_timeout_s: float = 600.0):
        parallel = ParallelConfig(
            ulysses_degree=system.ulysses_degree, ring_degree=system.ring_degree, cfg_degree=system.cfg_degree
        )
        # The adapter list is read once, here: every worker (and every respawn) loads exactly these.
        self.lora_adapters = resident_names(model)
        model = pin_resident(model, self.lora_adapters)
        threads = system.torch_threads or (max(1, (os.cpu_count() or 1) // parallel.world_size) if system.device == "cpu" else None)
        self.pool = WorkerPool(
            parallel.world_size,
            init_denoise_worker,
            init_args=(model, system),
            parallel=parallel,
            device=system.device,
            step_timeout_s=step_timeout_s,
            num_threads=threads,
            # compiling the blocks (and the warm-up) is part of every worker's start-up
            start_timeout_s=900.0 if system.compile_transformer else 300.0,
        )
        self.pool.start()
        ranks = self.pool.run_all("lora_adapters")
        if any(tuple(r) != self.lora_adapters for r in ranks):
            self.pool.shutdown()
            raise RuntimeError(f"LoRA adapters differ between the ranks: {ranks}; expected {self.lora_adapters}")

    def denoise(
        self, embeddings: Embeddings, params: UserParams, channel: str | None, cancel_check: Any = None
    ) -> tuple[torch.Tensor, dict]:
        """-> (latents, cache stats) from rank 0; every rank took the same cache decisions."""
        check_selection(params.lora, self.lora_adapters)  # a bad name is the request's error, not a pool failure
        # Every rank gets the image conditioning too (host memory, pickled through the pipes).
        conditioning = {
            name: value.detach().cpu().numpy()
            for name in CONDITIONING_FIELDS
            if (value := getattr(embeddings, name)) is not None
        }
        try:
            return self.pool.execute(
                "denoise",
                (
                    embeddings.prompt_embeds.cpu().numpy(),
                    embeddings.pooled_prompt_embeds.cpu().numpy(),
                    params,
                    channel,
                    conditioning,
                ),
                cancel_check=cancel_check,
            )
        except JobCancelledError as exc:
            raise DenoiseCancelled(f"cancelled: {exc}") from None
        except WorkerPoolError as exc:
            raise RuntimeError(f"worker pool failed this request (it restarts for the next one): {exc}") from None

    def close(self) -> None:
        self.pool.shutdown()
