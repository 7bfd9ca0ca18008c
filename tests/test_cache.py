"""Feature cache (smart_diffusion_backend.cache): tiny seeded Flux / Wan transformers in the families' own
denoise loops, against plain diffusers-style loops written out here.

Cache on / off / ratio 0 compared as diffusers' cache tests do; per-request isolation; the 2-rank gloo
decision agreement under sequence parallelism.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.hooks import HookRegistry

from smart_diffusion_backend.cache import (
    HEAD_HOOK,
    TAIL_HOOK,
    CacheConfig,
    CacheHookSet,
    request_cache,
    validate_model_cache,
)
from smart_diffusion_backend.cache.session import _newton
from smart_diffusion_backend.errors import ConfigError
from smart_diffusion_backend.families.base import Embeddings
from smart_diffusion_backend.parallel import parallel_state as ps
from smart_diffusion_backend.params import ModelParams, SystemParams, UserParams

from .conftest import ensure_tiny_model

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
STEPS = 16
# A model-yaml `cache:` section (test data; docs/cache.md proposes the real ones).
MODEL_CACHE = {
    "policy": "teacache",
    "threshold": [0.04, 0.6],
    "warmup_steps": [3, 1],
    "cooldown_steps": [2, 1],
    "max_consecutive_skips": [1, 4],
}
FBC_CACHE = {**MODEL_CACHE, "policy": "fbc", "threshold": [0.05, 0.6]}


# ---- tiny components ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest (and kind to a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def make_wan(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=256,
    ).eval()


def wan_scheduler() -> UniPCMultistepScheduler:  # Wan2.1's own (flow UniPC, shift 3)
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
        solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )


def wan_inputs(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 3, 8, 8, generator=g) * scale  # 3 x 4 x 4 = 48 tokens
    return latents, torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)


def wan_denoiser(transformer):
    """The Wan family's denoiser stage running `transformer`; tiny-wan's directory gives the scheduler (the
    one wan_scheduler() builds) and the VAE scales."""
    from smart_diffusion_backend.families.wan.stages import WanDenoiser

    return WanDenoiser(ModelParams.load("tiny-wan"), SystemParams.load("cpu"), transformer=transformer)


def run_wan(transformer, config, seed=0, steps=STEPS, reduce=None, scale=1.0):
    """WanDenoiser.denoise (true CFG at guidance 5: a "cond" and an "uncond" branch per step) from
    wan_inputs(seed, scale), with the cache `config` and the ranks' `reduce`: -> (latents, cache stats)."""
    latents, cond, uncond = wan_inputs(seed, scale)
    denoiser = wan_denoiser(transformer)
    denoiser.prepare_latents = lambda params: latents.clone()
    denoiser.reduce_metric = reduce
    params = UserParams(prompt="p", negative_prompt="", height=latents.shape[-2] * 8, width=latents.shape[-1] * 8,
                        steps=steps, guidance_scale=5.0, cache_ratio=0.0, seed=seed, num_frames=9)
    embeddings = Embeddings(torch.cat([cond, uncond]), cond.new_zeros(2, 0))
    stats: dict = {}
    out = denoiser.denoise(embeddings, params, stats=stats, cache_config=config)
    return out, stats


def run_flux(denoiser, embeddings, params, config):
    """FluxDenoiser.denoise with an explicit cache config: -> (latents, cache stats)."""
    stats: dict = {}
    out = denoiser.denoise(embeddings, params, stats=stats, cache_config=config)
    return out, stats


@pytest.fixture(scope="module")
def wan():
    ensure_tiny_model("tiny-wan")
    return make_wan()


@pytest.fixture(scope="module")
def flux(tiny_flux, cpu_system):
    from smart_diffusion_backend.families.flux.stages import FluxDenoiser

    return FluxDenoiser(tiny_flux, cpu_system)


def flux_inputs(seed: int = 0, steps: int = STEPS):
    g = torch.Generator().manual_seed(seed)
    embeddings = Embeddings(torch.randn(1, 32, 32, generator=g), torch.randn(1, 32, generator=g))
    params = UserParams(prompt="p", negative_prompt="", height=64, width=64, steps=steps, guidance_scale=3.5,
                        cache_ratio=0.0, seed=seed)
    return embeddings, params


def no_cache_hooks(transformer) -> bool:
    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", []),
              *getattr(transformer, "blocks", [])]
    return (
        not CacheHookSet.installed_on(transformer)
        and all(not hasattr(b, "_diffusers_hook") and "forward" not in b.__dict__ for b in blocks)
    )


# ---- config ----------------------------------------------------------------------------------------


def test_config_from_model_cache():
    assert CacheConfig.from_model_cache(MODEL_CACHE, 0.0) is None
    assert CacheConfig.from_model_cache({}, 0.7) is None  # model without a cache: section
    lo, mid, hi = (CacheConfig.from_model_cache(MODEL_CACHE, r) for r in (1e-6, 0.5, 1.0))
    assert (lo.threshold, lo.warmup_steps, lo.cooldown_steps, lo.max_consecutive_skips) == pytest.approx((0.04, 3, 2, 1), abs=1e-5)
    assert (hi.threshold, hi.warmup_steps, hi.cooldown_steps, hi.max_consecutive_skips) == (0.6, 1, 1, 4)
    assert mid.threshold == pytest.approx(0.32) and mid.ratio == 0.5
    three = CacheConfig.from_model_cache({**MODEL_CACHE, "threshold": [0.1, 0.2, 0.8]}, 0.75)
    assert three.threshold == pytest.approx(0.5)
    validate_model_cache(MODEL_CACHE)
    with pytest.raises(ValueError, match="outside"):
        CacheConfig.from_model_cache(MODEL_CACHE, 1.5)
    with pytest.raises(ConfigError, match="non-decreasing"):
        validate_model_cache({**MODEL_CACHE, "threshold": [0.5, 0.1]})
    with pytest.raises(ConfigError, match="non-increasing"):
        validate_model_cache({**MODEL_CACHE, "warmup_steps": [1, 3]})
    with pytest.raises(ConfigError, match="unknown keys"):
        validate_model_cache({**MODEL_CACHE, "treshold": 0.1})
    with pytest.raises(ConfigError, match="policy"):
        validate_model_cache({**MODEL_CACHE, "policy": "magic"})


def test_newton_forecast_is_exact_on_polynomials():
    r = [torch.full((2,), float(v)) for v in (1.0, 3.0, 9.0)]  # 1 + 2x^2 ... at x = 0, 1, 2
    history = [(0, r[0], None), (1, r[1], None), (2, r[2], None)]
    assert torch.allclose(_newton(history, 4, 1), torch.full((2,), 33.0))  # quadratic through 3 points
    assert torch.allclose(_newton(history[1:], 4, 1), torch.full((2,), 21.0))  # linear through the last 2
    assert _newton(history, 4, 2) is None


# ---- ratio 0, cleanup ----------------------------------------------------------------------------------


def test_ratio_zero_is_bit_identical_flux(flux):
    embeddings, params = flux_inputs()
    reference = flux.denoise(embeddings, params)
    out, stats = run_flux(flux, embeddings, params, CacheConfig.from_model_cache(MODEL_CACHE, 0.0))
    assert torch.equal(out, reference)
    assert stats["cache_policy"] == "none" and stats["cache_steps_skipped"] == 0
    assert no_cache_hooks(flux.transformer)


def test_ratio_zero_is_bit_identical_wan(wan):
    latents, cond, uncond = wan_inputs()
    scheduler = wan_scheduler()
    scheduler.set_timesteps(STEPS)
    with torch.inference_mode():  # the plain WanPipeline loop, no cache code at all
        x = latents
        for t in scheduler.timesteps:
            ts = t.expand(1)
            c = wan(hidden_states=x, timestep=ts, encoder_hidden_states=cond, return_dict=False)[0]
            u = wan(hidden_states=x, timestep=ts, encoder_hidden_states=uncond, return_dict=False)[0]
            x = scheduler.step(u + 5.0 * (c - u), t, x, return_dict=False)[0]
    out, _ = run_wan(wan, None)
    assert torch.equal(out, x)


def test_threshold_zero_computes_everything_exactly(wan):
    """Hooks installed but never skipping: the same numbers as no cache (the hooks are transparent)."""
    reference, _ = run_wan(wan, None)
    out, stats = run_wan(wan, CacheConfig(policy="fbc", threshold=-1.0, max_consecutive_skips=4))
    assert torch.equal(out, reference) and stats["cache_forwards_skipped"] == 0


def test_session_cleanup_removes_hooks_even_on_error(wan):
    config = CacheConfig.from_model_cache(MODEL_CACHE, 1.0)
    with request_cache(wan, config, STEPS) as session:
        registry = wan.blocks[0]._diffusers_hook
        assert HEAD_HOOK in registry.hooks and TAIL_HOOK in wan.blocks[-1]._diffusers_hook.hooks
        assert session.hookset is not None
    assert no_cache_hooks(wan) and session.hookset is None
    with pytest.raises(RuntimeError, match="boom"):
        with request_cache(wan, config, STEPS):
            run_wan(wan, config)
            raise RuntimeError("boom")
    assert no_cache_hooks(wan)
    reference, _ = run_wan(wan, None)
    assert torch.equal(run_wan(wan, None)[0], reference)


def test_hook_reset_state_starts_over(wan):
    """The stateful head hook's reset_state (HookRegistry.reset_stateful_hooks) drops the branches."""
    config = CacheConfig.from_model_cache(MODEL_CACHE, 1.0)
    latents, cond, uncond = wan_inputs()
    with request_cache(wan, config, STEPS) as session, torch.inference_mode():
        with session.branch("cond"):
            wan(hidden_states=latents, timestep=torch.tensor([999]), encoder_hidden_states=cond, return_dict=False)
        assert session.decisions("cond") == "C"
        HookRegistry.check_if_exists_or_initialize(wan.blocks[0]).reset_stateful_hooks()
        assert session.decisions("cond") == ""


# ---- skipping behaviour ---------------------------------------------------------------------------------


def _sweep(run, section):
    results = {}
    for ratio in RATIOS:
        out, stats = run(CacheConfig.from_model_cache(section, ratio))
        results[ratio] = (out, stats)
    return results


@pytest.mark.parametrize("section", [MODEL_CACHE, FBC_CACHE], ids=["teacache", "fbc"])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_skips_monotone_in_ratio_and_first_last_computed(family, section, request):
    if family == "flux":
        denoiser = request.getfixturevalue("flux")
        embeddings, params = flux_inputs()
        results = _sweep(lambda cfg: run_flux(denoiser, embeddings, params, cfg), section)
    else:
        wan = request.getfixturevalue("wan")
        results = _sweep(lambda cfg: run_wan(wan, cfg), section)
    evals = [results[r][1]["cache_block_evals"] for r in RATIOS]
    skipped = [results[r][1]["cache_forwards_skipped"] for r in RATIOS]
    assert evals == sorted(evals, reverse=True), f"block evaluations not monotone in the ratio: {evals}"
    assert skipped == sorted(skipped), f"skips not monotone in the ratio: {skipped}"
    assert evals[-1] < evals[0] and skipped[0] == 0
    for ratio in RATIOS[1:]:
        stats = results[ratio][1]
        assert stats["cache_ratio"] == ratio and stats["cache_policy"] == section["policy"]
        assert stats["cache_block_evals_total"] == evals[0]
        for branch, schedule in stats["cache_schedule"].items():
            assert len(schedule) == STEPS and schedule[0] == "C" and schedule[-1] == "C", (ratio, branch, schedule)
        assert stats["cache_steps_computed"] + stats["cache_steps_skipped"] == STEPS
    if family == "wan":  # CFG: both branches have their own state
        assert set(results[1.0][1]["cache_schedule"]) == {"cond", "uncond"}
    # a cached result stays close to the uncached one on these random-weight models
    ref = results[0.0][0]
    err = (results[1.0][0] - ref).norm() / ref.norm()
    assert err < 0.1


def test_first_and_last_step_computed_even_at_huge_threshold(wan):
    config = CacheConfig(policy="teacache", threshold=1e9, max_consecutive_skips=100)
    _, stats = run_wan(wan, config, steps=6)
    assert stats["cache_schedule"] == {"cond": "CSSSSC", "uncond": "CSSSSC"}
    assert stats["cache_block_evals"] == 2 * 2 * 2  # two computed forwards per branch, 2 blocks each


def test_wan_denoiser_branches_from_diffusers_cache_context(wan):
    """A loop that only names its calls through transformer.cache_context(name, step_index=...)."""
    latents, cond, uncond = wan_inputs()
    config = CacheConfig.from_model_cache(MODEL_CACHE, 1.0)
    expected, expected_stats = run_wan(wan, config)
    scheduler = wan_scheduler()
    scheduler.set_timesteps(STEPS)
    with request_cache(wan, config, STEPS) as session, torch.inference_mode():
        x = latents
        for i, t in enumerate(scheduler.timesteps):
            ts = t.expand(1)
            with wan.cache_context("cond", step_index=i):
                c = wan(hidden_states=x, timestep=ts, encoder_hidden_states=cond, return_dict=False)[0]
            with wan.cache_context("uncond", step_index=i):
                u = wan(hidden_states=x, timestep=ts, encoder_hidden_states=uncond, return_dict=False)[0]
            x = scheduler.step(u + 5.0 * (c - u), t, x, return_dict=False)[0]
    assert torch.equal(x, expected)
    assert session.stats()["cache_schedule"] == expected_stats["cache_schedule"]


# ---- isolation ---------------------------------------------------------------------------------------


def test_interleaved_sessions_equal_their_solo_runs(wan):
    """Two requests (ratios 0 and 0.8, then 0.8 and 0.3) on one transformer, calls interleaved step by step."""
    for ratio_a, ratio_b in ((0.0, 0.8), (0.8, 0.3)):
        cfg_a = CacheConfig.from_model_cache(MODEL_CACHE, ratio_a)
        cfg_b = CacheConfig.from_model_cache(MODEL_CACHE, ratio_b)
        solo_a, stats_a = run_wan(wan, cfg_a, seed=1)
        solo_b, stats_b = run_wan(wan, cfg_b, seed=2)

        loops = []
        for seed, cfg in ((1, cfg_a), (2, cfg_b)):
            latents, cond, uncond = wan_inputs(seed)
            scheduler = wan_scheduler()
            scheduler.set_timesteps(STEPS)
            loops.append({"x": latents, "cond": cond, "uncond": uncond, "sched": scheduler, "cfg": cfg})
        with request_cache(wan, cfg_a, STEPS) as sa, request_cache(wan, cfg_b, STEPS) as sb, torch.inference_mode():
            for i in range(STEPS):
                for loop, session in ((loops[0], sa), (loops[1], sb)):
                    session.step(i)
                t = loops[0]["sched"].timesteps[i]
                preds = [{}, {}]
                for branch in ("cond", "uncond"):  # A cond, B cond, A uncond, B uncond
                    for k, (loop, session) in enumerate(((loops[0], sa), (loops[1], sb))):
                        with session.branch(branch):
                            preds[k][branch] = wan(hidden_states=loop["x"], timestep=t.expand(1),
                                                   encoder_hidden_states=loop[branch], return_dict=False)[0]
                for k, loop in enumerate(loops):
                    c, u = preds[k]["cond"], preds[k]["uncond"]
                    loop["x"] = loop["sched"].step(u + 5.0 * (c - u), t, loop["x"], return_dict=False)[0]
        assert torch.equal(loops[0]["x"], solo_a)
        assert torch.equal(loops[1]["x"], solo_b)
        if cfg_b is not None:
            assert sb.stats()["cache_schedule"] == stats_b["cache_schedule"]
        assert no_cache_hooks(wan)


def test_interleaved_flux_requests(flux):
    """Two FluxDenoiser-style requests alternating forward by forward (implicit "call0" branches)."""
    cfg = CacheConfig.from_model_cache(MODEL_CACHE, 0.8)
    (emb1, p1), (emb2, p2) = flux_inputs(1), flux_inputs(2)
    solo1, _ = run_flux(flux, emb1, p1, cfg)
    solo2, _ = run_flux(flux, emb2, p2, None)
    # generators: run both loops as coroutines, one transformer call at a time
    gens = [_flux_steps(flux, emb1, p1, cfg), _flux_steps(flux, emb2, p2, None)]
    outs = [None, None]
    # Grad mode is a per-thread stack: entered once here, not inside the interleaved generators, whose
    # out-of-order exits would otherwise leave inference mode switched on for later tests.
    with torch.inference_mode():
        while any(o is None for o in outs):
            for k, g in enumerate(gens):
                if outs[k] is None:
                    try:
                        next(g)
                    except StopIteration as stop:
                        outs[k] = stop.value
    assert torch.equal(outs[0], solo1) and torch.equal(outs[1], solo2)


def _flux_steps(denoiser, embeddings, params, config):
    from diffusers import FluxPipeline

    prompt_embeds, pooled = embeddings.prompt_embeds, embeddings.pooled_prompt_embeds
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    latents, image_ids = denoiser.prepare_latents(params)
    scheduler, timesteps = denoiser.make_scheduler(params.steps, latents.shape[1])
    guidance = torch.full([1], params.guidance_scale)
    session = request_cache(denoiser.transformer, config, len(timesteps))
    with session:
        for i, t in enumerate(timesteps):
            session.step(i)
            with session.branch("cond"):
                noise = denoiser.transformer(hidden_states=latents, timestep=t.expand(1) / 1000, guidance=guidance,
                                             pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                             txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            yield
    return FluxPipeline._unpack_latents(latents, params.height, params.width, denoiser.vae_scale_factor)


# ---- sequence parallel: every rank takes the same decision -----------------------------------------------


class _CacheRank:
    """One rank of a 2-process pool; its loops pass the max over the ranks as the cache's ``reduce``, as the
    denoiser's worker pool does."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.wan = make_wan()  # same weights on every rank

    def independent(self, threshold: float, sync: bool):
        """Each rank denoises different inputs (no SP sharding): only the metric all-reduce couples them."""
        config = CacheConfig(policy="teacache", threshold=threshold, max_consecutive_skips=3, sync_ranks=sync)
        _, stats = run_wan(self.wan, config, seed=10 + 7 * self.ctx.rank, reduce=ps.all_reduce_max,
                           scale=1.0 + 2.0 * self.ctx.rank)
        return stats["cache_schedule"]

    def sequence_parallel(self, threshold: float):
        """Ulysses over 2 ranks: each rank's blocks see its own half of the tokens."""
        from smart_diffusion_backend.parallel.transformer_sp import parallelize_transformer

        handle = parallelize_transformer(self.wan)
        try:
            config = CacheConfig(policy="fbc", threshold=threshold, max_consecutive_skips=3)
            out, stats = run_wan(self.wan, config, reduce=ps.all_reduce_max)
        finally:
            handle.remove()
        return stats["cache_schedule"], out


def _init_cache_rank(ctx):
    torch.set_num_threads(1)
    return _CacheRank(ctx)


@pytest.fixture(scope="module")
def pool():
    from smart_diffusion_backend.parallel.parallel_state import ParallelConfig
    from smart_diffusion_backend.parallel.worker_pool import WorkerPool

    ensure_tiny_model("tiny-wan")
    p = WorkerPool(2, _init_cache_rank, parallel=ParallelConfig(ulysses_degree=2), num_threads=1,
                   start_timeout_s=120, step_timeout_s=120, collective_timeout_s=60)
    p.start()
    yield p
    p.shutdown()


@pytest.mark.pool
def test_two_ranks_take_identical_decisions(pool):
    synced = pool.run_all("independent", 0.15, True)
    assert synced[0] == synced[1], synced
    assert "S" in synced[0]["cond"]
    unsynced = pool.run_all("independent", 0.15, False)
    # the control: on their own, ranks with different inputs decide differently (so the all-reduce matters)
    assert unsynced[0] != unsynced[1], unsynced


@pytest.mark.pool
def test_sequence_parallel_ranks_agree_and_match(pool):
    results = pool.run_all("sequence_parallel", 0.1)
    (sched0, out0), (sched1, out1) = results
    assert sched0 == sched1 and "S" in sched0["cond"]
    assert torch.equal(out0, out1)  # both ranks return the same full prediction
