"""The one-rank denoiser honours the system's `attention_backend` and `compile_transformer` (CPU).

Compile: the repeated blocks' forwards are compiled at load (warm-up at the default size, its seconds
reported), outputs equal the eager stage within float32 reordering, and the feature cache's hooks keep
working around the compiled blocks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from smart_diffusion_backend.families.flux.attention import FluxPluggableAttnProcessor
from smart_diffusion_backend.families.wan.attention import WanPluggableAttnProcessor
from smart_diffusion_backend.params import SystemParams, parse_user_params
from smart_diffusion_backend.service import load_stage

from .conftest import ensure_tiny_model
from .reference import rel_l2


def user_params(model, system, **values):
    tensors = {"SEED": np.array([3], np.int64), "STEPS": np.array([values.pop("steps", 4)], np.int32)}
    for name, value in values.items():
        dtype = np.float32 if name in ("CACHE_RATIO", "GUIDANCE_SCALE") else np.int32
        tensors[name] = np.array([value], dtype)
    return parse_user_params(tensors, model, system, require_prompt=False)


@pytest.fixture(scope="module")
def flux_embeddings(tiny_flux, cpu_system):
    return load_stage("text_encoder", tiny_flux, cpu_system).encode("a red circle", None)


@pytest.fixture(scope="module")
def flux_eager(tiny_flux, cpu_system):
    return load_stage("denoiser", tiny_flux, cpu_system)


@pytest.mark.pool
def test_compiled_pool_equals_the_eager_one_rank_denoiser(tiny_flux, cpu_system, flux_embeddings, flux_eager):
    """A Ulysses-2 pool with compile_transformer: each rank compiles after its SP processors are in and
    warms up with the other; the output equals the eager one-rank denoiser in float32."""
    from smart_diffusion_backend.parallel.denoise_worker import PooledDenoiser

    system = dataclasses.replace(SystemParams.load("cpu-sp2"), compile_transformer=True)
    system.validate()
    pool = PooledDenoiser(tiny_flux, system)
    try:
        seconds = pool.pool.run_all("compile_seconds")
        assert len(seconds) == 2 and all(s is not None and s > 0 for s in seconds), seconds
        params = user_params(tiny_flux, cpu_system, steps=4)
        latents, _ = pool.denoise(flux_embeddings, params, None)
        assert rel_l2(latents, flux_eager.denoise(flux_embeddings, params)) <= 1e-5
    finally:
        pool.close()


def test_compiled_flux_equals_eager_and_keeps_the_cache(tiny_flux, cpu_system, flux_embeddings, flux_eager):
    compiled = load_stage("denoiser", tiny_flux, dataclasses.replace(cpu_system, compile_transformer=True))
    assert compiled.compile_seconds is not None and compiled.compile_seconds > 0
    assert flux_eager.compile_seconds is None
    # At the default size (compiled at load) and with the feature cache on (its hooks wrap the compiled blocks).
    for ratio in (0.0, 1.0):
        params = user_params(tiny_flux, cpu_system, CACHE_RATIO=ratio, steps=8)
        stats_eager, stats_compiled = {}, {}
        eager = flux_eager.denoise(flux_embeddings, params, stats=stats_eager)
        out = compiled.denoise(flux_embeddings, params, stats=stats_compiled)
        assert rel_l2(out, eager) <= 1e-5, ratio
        assert stats_compiled == stats_eager  # the same skip decisions
    assert stats_compiled["cache_forwards_skipped"] > 0  # ratio 1 skipped steps around the compiled blocks


def test_triton_backend_reaches_the_one_rank_flux_denoiser(tiny_flux, cpu_system, flux_embeddings, flux_eager, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton_stage = load_stage("denoiser", tiny_flux, dataclasses.replace(cpu_system, attention_backend="triton"))
    processors = set(type(p) for p in triton_stage.transformer.attn_processors.values())
    assert processors == {FluxPluggableAttnProcessor}
    assert FluxPluggableAttnProcessor not in set(type(p) for p in flux_eager.transformer.attn_processors.values())
    params = user_params(tiny_flux, cpu_system, steps=2)
    out = triton_stage.denoise(flux_embeddings, params)
    assert rel_l2(out, flux_eager.denoise(flux_embeddings, params)) <= 1e-4


def test_compiled_wan_with_the_triton_backend_equals_eager(cpu_system, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = ensure_tiny_model("tiny-wan")
    embeddings = load_stage("text_encoder", model, cpu_system).encode("a cat", "")
    eager = load_stage("denoiser", model, cpu_system)
    system = dataclasses.replace(cpu_system, compile_transformer=True, attention_backend="triton")
    compiled = load_stage("denoiser", model, system)
    assert set(type(p) for p in compiled.transformer.attn_processors.values()) == {WanPluggableAttnProcessor}
    assert compiled.compile_seconds > 0
    params = user_params(model, cpu_system, steps=2)
    assert rel_l2(compiled.denoise(embeddings, params), eager.denoise(embeddings, params)) <= 1e-4


@pytest.mark.server
def test_a_served_compiled_denoiser_draws_the_eager_image_and_logs_its_compile(tiny_flux, tmp_path, flux_embeddings, flux_eager, cpu_system):
    # Also guards the stub's "C" locale: inductor reads UTF-8 templates, which failed inside a stub.
    from smart_diffusion_backend.repository import write_repository
    from smart_diffusion_client import Request, SmartDiffusionClient

    from .conftest import start_server, stop_server_and_check, system_yaml_with

    system_yaml = system_yaml_with("cpu-1thread", tmp_path / "cpu-1thread-compiled.yaml", compile_transformer="true")
    write_repository(tmp_path / "repo", ["tiny-flux"], str(system_yaml))
    server, shm_before = start_server(tmp_path / "repo", tmp_path)
    try:
        with SmartDiffusionClient(server.grpc_url, "grpc") as client:
            served = client.infer(Request(prompt="a red circle", height=64, width=64, steps=4, seed=3)).image
    finally:
        stop_server_and_check(server, shm_before)
    assert "compiled 3 repeated blocks" in (tmp_path / "tritonserver.log").read_text()
    params = user_params(tiny_flux, cpu_system, steps=4, HEIGHT=64, WIDTH=64)
    eager = load_stage("decoder", tiny_flux, cpu_system).decode(flux_eager.denoise(flux_embeddings, params))[0]
    assert served.shape == eager.shape
    assert np.abs(served.astype(np.int16) - eager.astype(np.int16)).max() <= 1


def test_fp8_linear_denoiser_stays_near_the_float_one_eager_and_compiled(tiny_flux, cpu_system, flux_embeddings,
                                                                         flux_eager):
    from smart_diffusion_backend.quant import Fp8Linear

    params = user_params(tiny_flux, cpu_system, steps=4)
    reference = flux_eager.denoise(flux_embeddings, params)
    fp8 = load_stage("denoiser", tiny_flux, dataclasses.replace(cpu_system, fp8_linear=True))
    assert any(isinstance(m, Fp8Linear) for m in fp8.transformer.modules())
    out = fp8.denoise(flux_embeddings, params)
    assert 1e-4 < rel_l2(out, reference) <= 0.1  # quantised, and close
    compiled = load_stage("denoiser", tiny_flux,
                          dataclasses.replace(cpu_system, fp8_linear=True, compile_transformer=True))
    assert rel_l2(compiled.denoise(flux_embeddings, params), out) <= 1e-3  # the e4m3 GEMMs compile too


@pytest.mark.pool
def test_fp8_linear_pool_equals_the_fp8_one_rank_denoiser(tiny_flux, cpu_system, flux_embeddings):
    """Each rank of a Ulysses-2 pool quantises the same weights the same way: the pooled fp8 denoiser equals
    the one-rank fp8 denoiser (the GEMMs are row-local, so sharding the sequence changes nothing)."""
    from smart_diffusion_backend.parallel.denoise_worker import PooledDenoiser

    params = user_params(tiny_flux, cpu_system, steps=4)
    one_rank = load_stage("denoiser", tiny_flux, dataclasses.replace(cpu_system, fp8_linear=True))
    system = dataclasses.replace(SystemParams.load("cpu-sp2"), fp8_linear=True)
    pool = PooledDenoiser(tiny_flux, system)
    try:
        latents, _ = pool.denoise(flux_embeddings, params, None)
    finally:
        pool.close()
    assert rel_l2(latents, one_rank.denoise(flux_embeddings, params)) <= 1e-5
