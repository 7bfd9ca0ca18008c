"""SD3 (StableDiffusion3Pipeline: CLIP-L + CLIP-G + T5, MMDiT, true CFG): the split stages in-process, the
feature cache, the pluggable attention processor, sequence parallelism on 2 gloo ranks and a real
tritonserver serving tiny-sd3, against diffusers' own pipeline."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from smart_diffusion_backend.cache import CacheConfig
from smart_diffusion_backend.errors import ConfigError, ParamError
from smart_diffusion_backend.families import family, load_stage
from smart_diffusion_backend.params import ModelParams, SystemParams, UserParams
from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

from .conftest import ensure_tiny_model, serving
from .reference import rel_l2

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5  # rel-L2, as tests/test_parallel_attention.py
CLIP_TOKENS = 77

# A CFG request with an explicit negative prompt, served and compared with the pipeline.
CASE = dict(prompt="a red circle", negative_prompt="blurry", height=64, width=80, steps=3, guidance_scale=4.5, seed=42)



@functools.lru_cache(maxsize=2)
def _sd3_pipeline(weights: str):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_reference(
    model: ModelParams,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    num_images: int = 1,
) -> np.ndarray:
    """StableDiffusion3Pipeline's images as uint8 [N, H, W, 3] (output_type="pil")."""
    images = _sd3_pipeline(str(model.weights))(
        prompt,
        negative_prompt=negative_prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=model.max_sequence_length - CLIP_TOKENS,
        num_images_per_prompt=num_images,
    ).images
    return np.stack([np.asarray(image) for image in images])


@pytest.fixture(scope="module")
def tiny_sd3():
    return ensure_tiny_model("tiny-sd3")


@pytest.fixture(scope="module")
def stages(tiny_sd3, cpu_system):
    return {k: load_stage(k, tiny_sd3, cpu_system) for k in ("text_encoder", "denoiser", "decoder")}


def user_params(prompt="a cat", negative="", height=64, width=64, steps=2, guidance=4.5, seed=1, images=1) -> UserParams:
    return dataclasses.replace(UserParams(prompt, negative, height, width, steps, guidance, 0.0, seed), num_images=images)


# --------------------------------------------------------------------------------------------
# In-process stages against StableDiffusion3Pipeline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,negative,height,width,steps,guidance,seed,images",
    [
        ("a red circle", None, 64, 64, 3, 4.5, 1, 1),  # default: CFG with the empty negative prompt
        ("two blue squares", "blurry, low quality", 48, 80, 2, 7.0, 123456789, 1),  # CFG, negative prompt
        ("a cat", "ugly", 32, 32, 2, 1.0, 7, 1),  # guidance 1: no CFG, negative prompt ignored (as the pipeline)
        ("a green triangle", "a dog", 64, 48, 2, 4.5, 9, 2),  # NUM_IMAGES 2 = num_images_per_prompt 2, CFG
    ],
)
def test_split_stages_are_bit_exact_with_sd3_pipeline(
    tiny_sd3, stages, prompt, negative, height, width, steps, guidance, seed, images
):
    embeddings = stages["text_encoder"].encode(prompt, negative)
    # [prompt; negative], CLIP's 77 tokens then T5's, T5's width; pooled: CLIP-L's 16 + CLIP-G's 32
    assert embeddings.prompt_embeds.shape == (2, tiny_sd3.max_sequence_length, 64)
    assert embeddings.pooled_prompt_embeds.shape == (2, 48)
    params = user_params(prompt, negative or "", height, width, steps, guidance, seed, images)
    latents = stages["denoiser"].denoise(embeddings, params)
    assert latents.shape == (images, 16, height // 8, width // 8)
    pixels = stages["decoder"].decode(latents)
    reference = sd3_reference(
        tiny_sd3, prompt, negative_prompt=negative, height=height, width=width, steps=steps,
        guidance_scale=guidance, seed=seed, num_images=images,
    )
    assert pixels.dtype == np.uint8 and pixels.shape == (images, height, width, 3)
    np.testing.assert_array_equal(pixels, reference)


def test_negative_prompt_row_is_the_negative_prompt_alone(stages):
    """Each row is encoded on its own: row 0 does not depend on the negative prompt, row 1 is "" by default."""
    encoder = stages["text_encoder"]
    plain, negative = encoder.encode("a cat", None), encoder.encode("a cat", "a dog")
    empty = encoder.encode("", None)
    assert torch.equal(plain.prompt_embeds[0], negative.prompt_embeds[0])
    assert torch.equal(plain.prompt_embeds[1], empty.prompt_embeds[0])
    assert not torch.equal(plain.prompt_embeds[1], negative.prompt_embeds[1])


def test_cfg_pool_branches_match_the_batched_forward(stages):
    """A CFG-parallel pool swaps run_branches: the loop then runs cond and uncond as two forwards, which must
    agree with the pipeline's one batch-2 forward."""
    denoiser = stages["denoiser"]
    calls = []

    def recording(forward, cond_kwargs, uncond_kwargs):
        calls.append((cond_kwargs["branch"], uncond_kwargs["branch"]))
        return forward(**cond_kwargs), forward(**uncond_kwargs)

    embeddings = stages["text_encoder"].encode("a cat", "blurry")
    batched = denoiser.denoise(embeddings, user_params(steps=3))
    denoiser.run_branches = recording
    try:
        branched = denoiser.denoise(embeddings, user_params(steps=3))
        assert calls == [("cond", "uncond")] * 3
        calls.clear()
        denoiser.denoise(embeddings, user_params(steps=2, guidance=1.0))  # no CFG: one pass, no branches
        assert calls == []
    finally:
        del denoiser.run_branches
    assert rel_l2(branched, batched) <= TOL


def test_cfg_without_a_negative_row_is_refused(stages):
    embeddings = stages["text_encoder"].encode("a cat", None)
    one_row = dataclasses.replace(
        embeddings, prompt_embeds=embeddings.prompt_embeds[:1], pooled_prompt_embeds=embeddings.pooled_prompt_embeds[:1]
    )
    with pytest.raises(ParamError, match="PROMPT_EMBEDS: GUIDANCE_SCALE 4.5 > 1 needs 2 rows"):
        stages["denoiser"].denoise(one_row, user_params())
    assert stages["denoiser"].denoise(one_row, user_params(guidance=1.0)).shape == (1, 16, 8, 8)


def test_sizes_the_pipeline_refuses_are_param_errors(stages):
    embeddings = stages["text_encoder"].encode("a cat", None)
    with pytest.raises(ParamError, match="HEIGHT: 72 is not a multiple of 16"):
        stages["denoiser"].denoise(embeddings, user_params(height=72))
    with pytest.raises(ParamError, match="WIDTH: 1040 is larger than this transformer's positional embedding"):
        stages["denoiser"].denoise(embeddings, user_params(width=1040))


def test_step_callback_sees_every_step(stages):
    embeddings = stages["text_encoder"].encode("a cat", None)
    seen = []
    stages["denoiser"].denoise(embeddings, user_params(steps=3), on_step=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_max_sequence_length_is_clip_plus_t5(tiny_sd3):
    from smart_diffusion_backend.families.sd3.spec import t5_tokens
    from smart_diffusion_backend.stage_shapes import StageShapes

    assert t5_tokens(tiny_sd3.max_sequence_length, CLIP_TOKENS) == 32
    assert t5_tokens(333, CLIP_TOKENS) == 256  # sd3.5-medium.yaml: the pipeline's default T5 length
    with pytest.raises(ConfigError, match="CLIP's 77 tokens"):
        t5_tokens(77, CLIP_TOKENS)
    with pytest.raises(ConfigError, match="1..512"):
        t5_tokens(77 + 513, CLIP_TOKENS)
    shapes = StageShapes.load(tiny_sd3)
    assert shapes.embeds_dims() == [2, 109, 64] and shapes.pooled_dims() == [2, 48]
    assert shapes.latent_dims() == [-1, 16, -1, -1]  # NUM_IMAGES images per request
    assert ModelParams.load("sd3.5-medium").family == "sd3"


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------


def test_cache_ratio_zero_is_bit_exact_and_higher_ratios_skip_blocks(tiny_sd3, stages):
    denoiser = stages["denoiser"]
    embeddings = stages["text_encoder"].encode("a red circle", "blurry")
    params = user_params(steps=8)
    plain = denoiser.denoise(embeddings, params, cache_config=None)  # no cache code at all
    runs = {}
    for ratio in (0.0, 0.5, 1.0):
        stats: dict = {}
        runs[ratio] = denoiser.denoise(embeddings, dataclasses.replace(params, cache_ratio=ratio), stats=stats), stats
    off, on_half, on_full = (runs[r][1] for r in (0.0, 0.5, 1.0))
    assert torch.equal(runs[0.0][0], plain)
    assert off["cache_policy"] == "none" and off["cache_block_evals"] == 8 * 3  # 8 batch-2 forwards x 3 blocks
    for stats in (on_half, on_full):
        assert stats["cache_policy"] == "teacache" and stats["cache_block_evals_total"] == 24
        schedule = stats["cache_schedule"]["cfg"]  # one decision per step for the [negative; prompt] batch
        assert len(schedule) == 8 and schedule[0] == schedule[-1] == "C"
    assert off["cache_block_evals"] > on_half["cache_block_evals"] >= on_full["cache_block_evals"], (on_half, on_full)
    assert rel_l2(runs[1.0][0], plain) < 0.1


def test_cache_points_skip_the_whole_stack(tiny_sd3, stages):
    """A forced skip returns the stack's input plus the cached residual of both streams (the last block is
    context_pre_only: its text output is None), and the hooks are gone after the request."""
    from smart_diffusion_backend.cache import CacheHookSet

    denoiser = stages["denoiser"]
    embeddings = stages["text_encoder"].encode("a cat", None)
    stats: dict = {}
    config = CacheConfig(policy="teacache", threshold=1e9, max_consecutive_skips=100)
    denoiser.denoise(embeddings, user_params(steps=5), stats=stats, cache_config=config)
    assert stats["cache_schedule"] == {"cfg": "CSSSC"} and stats["cache_block_evals"] == 2 * 3
    assert not CacheHookSet.installed_on(denoiser.transformer)
    fbc: dict = {}
    denoiser.denoise(embeddings, user_params(steps=5), stats=fbc, cache_config=dataclasses.replace(config, policy="fbc"))
    assert fbc["cache_schedule"] == {"cfg": "CSSSC"} and fbc["cache_block_evals"] == 2 * 3 + 3 * 1


# --------------------------------------------------------------------------------------------
# The pluggable attention processor (sdpa, and our Triton kernel under the interpreter)
# --------------------------------------------------------------------------------------------


def tiny_transformer(heads: int = 2, seed: int = 0):
    """tiny-sd3's transformer architecture (SD3.5 layout: dual attention in block 0, RMS QK-norm)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=heads,
        joint_attention_dim=64, caption_projection_dim=16 * heads, pooled_projection_dim=48, out_channels=16,
        pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def transformer_inputs(batch: int = 1, h: int = 8, w: int = 6, text: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 64, generator=g),
        pooled_projections=torch.randn(batch, 48, generator=g),
        timestep=torch.full((batch,), 700.0),
        return_dict=False,
    )


def test_sdpa_processor_matches_diffusers_bit_exactly():
    from smart_diffusion_backend.attention.processors import attention_for, install_attention

    model, inputs = tiny_transformer(), transformer_inputs(batch=2)
    with torch.no_grad():
        expected = model(**inputs)[0]
        install_attention(model, attention_for("sdpa"))
        actual = model(**inputs)[0]
    assert type(model.transformer_blocks[0].attn2.processor).__name__ == "SD3PluggableAttnProcessor"
    assert torch.equal(actual, expected)


def test_triton_processor_under_interpreter(monkeypatch):
    from smart_diffusion_backend.attention.processors import attention_for, install_attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, inputs = tiny_transformer(), transformer_inputs(h=4, w=4, text=5)
    with torch.no_grad():
        expected = model(**inputs)[0]
        install_attention(model, attention_for("triton"))
        actual = model(**inputs)[0]
    assert rel_l2(actual, expected) <= TOL


def test_attention_calls_are_joint_image_then_text_and_image_only():
    import torch.nn.functional as F

    from smart_diffusion_backend.attention.processors import install_attention

    calls = []

    def recording(q, k, v, *, softmax_scale=None, kv_len=None, return_lse=False):
        calls.append((tuple(q.shape), tuple(k.shape)))
        return F.scaled_dot_product_attention(q, k, v)

    model = tiny_transformer()
    install_attention(model, recording)  # the family is found from SD3Transformer2DModel
    with torch.no_grad():
        model(**transformer_inputs(h=8, w=6, text=7))
    joint, image = (1, 2, 12 + 7, 16), (1, 2, 12, 16)  # 4 x 3 patches, then the 7 text tokens
    assert calls == [(joint, joint), (image, image), (joint, joint), (joint, joint)]  # block 0: attn, attn2


def test_blocks_compile_in_one_graph_each_and_keep_the_cache(tiny_sd3, cpu_system, stages):
    """compile_transformer finds SD3's blocks (the denoiser names them: diffusers' class does not) and each
    traces without a graph break (fullgraph); the cache's hooks decide around the compiled blocks. aot_eager
    keeps the test short: the graphs are what inductor would get."""
    from smart_diffusion_backend.attention.compile import compile_repeated_blocks

    compiled = load_stage("denoiser", tiny_sd3, cpu_system)
    assert compile_repeated_blocks(compiled.transformer, fullgraph=True, backend="aot_eager") == 3
    embeddings = stages["text_encoder"].encode("a red circle", "blurry")
    params = dataclasses.replace(user_params(steps=6), cache_ratio=1.0)
    eager_stats, compiled_stats = {}, {}
    try:
        eager = stages["denoiser"].denoise(embeddings, params, stats=eager_stats)
        out = compiled.denoise(embeddings, params, stats=compiled_stats)
    finally:
        torch._dynamo.reset()
    assert rel_l2(out, eager) <= TOL and compiled_stats == eager_stats and compiled_stats["cache_forwards_skipped"] > 0


# --------------------------------------------------------------------------------------------
# Sequence parallelism: 2 gloo processes (the denoiser pool's own worker code) vs one process
# --------------------------------------------------------------------------------------------

# (heads, batch, latent h, latent w, text tokens): joint lengths not divisible by 2
SP_CASES = {
    "image-on-both-ranks": (2, 1, 16, 16, 7),  # 64 image + 7 text = 71
    "rank1-text-only": (2, 1, 4, 6, 15),  # 6 image + 15 text: rank 1 holds no image token (empty attn2 part)
    "batch2": (2, 2, 10, 8, 9),  # 20 + 9 = 29
    "3-heads": (3, 1, 8, 8, 5),  # 16 + 5; under Ulysses-2 the heads do not divide: ring fallback
}


class _SD3Rank:
    def __init__(self, ctx):
        self.ctx = ctx

    def transformers(self, layouts: list[tuple[int, int]]) -> dict[str, float]:
        """The family's sequence plan on tiny transformers vs the unmodified model, rel-L2 per layout/case."""
        from smart_diffusion_backend.parallel import SPTransformerConfig, parallelize_transformer
        from smart_diffusion_backend.parallel import parallel_state as ps

        errors = {}
        for name, (heads, batch, h, w, text) in SP_CASES.items():
            inputs = transformer_inputs(batch, h, w, text)
            with torch.no_grad():
                reference = tiny_transformer(heads)(**inputs)[0]
            for u, r in layouts:
                ps.set_parallel_degrees(ulysses_degree=u, ring_degree=r, cfg_degree=1)
                model = tiny_transformer(heads)
                handle = parallelize_transformer(model, SPTransformerConfig(attention_backend="sdpa"))
                with torch.no_grad():
                    out = model(**inputs)[0]
                handle.remove()
                errors[f"u{u}r{r}/{name}/{handle.attention.plan(heads)}"] = rel_l2(out, reference)
        return errors

    def denoise(self, system_name: str, embeds: np.ndarray, pooled: np.ndarray, params: UserParams, cfg: bool = False):
        """One request through the denoiser pool's worker (parallelize_transformer + the max over ranks for the
        cache); `cfg`: CFG-parallel instead (cond on rank 0, uncond on rank 1)."""
        from smart_diffusion_backend.parallel import cfg_parallel
        from smart_diffusion_backend.parallel import parallel_state as ps
        from smart_diffusion_backend.parallel.denoise_worker import DenoiseWorker

        system = SystemParams.load(system_name)
        if cfg:
            ps.set_parallel_degrees(ulysses_degree=1, ring_degree=1, cfg_degree=2)
            stage = load_stage("denoiser", ModelParams.load("tiny-sd3"), system)
            stage.run_branches = cfg_parallel
            stats: dict = {}
            return stage.denoise(_embeddings(embeds, pooled), params, stats=stats), stats
        ps.set_parallel_degrees(ulysses_degree=system.ulysses_degree, ring_degree=system.ring_degree, cfg_degree=1)
        worker = DenoiseWorker(self.ctx, ModelParams.load("tiny-sd3"), system)
        try:
            return worker.denoise(embeds, pooled, params, None)
        finally:
            worker.sp_handle.remove()


def _embeddings(embeds: np.ndarray, pooled: np.ndarray):
    from smart_diffusion_backend.families import Embeddings

    return Embeddings(torch.from_numpy(embeds), torch.from_numpy(pooled))


def _init_sd3_rank(ctx):
    torch.set_num_threads(1)
    return _SD3Rank(ctx)


@pytest.fixture(scope="module")
def sd3_pool(tiny_sd3):
    from smart_diffusion_backend.parallel import WorkerPool
    from smart_diffusion_backend.parallel.parallel_state import ParallelConfig

    pool = WorkerPool(2, _init_sd3_rank, parallel=ParallelConfig(ulysses_degree=2), num_threads=1,
                      start_timeout_s=180, step_timeout_s=180)
    pool.start()
    yield pool
    pool.shutdown()


def test_sequence_plan_segments_and_segment_attention():
    plan = family("sd3").sequence_plan
    assert plan.segments == ("image", "text") and plan.gather.segments == ("image",)
    assert dict(plan.segment_attention) == {"transformer_blocks.*.attn2": ("image",)}


@pytest.mark.pool
def test_sp_transformers_ulysses_and_ring_match_one_process(sd3_pool):
    errors = sd3_pool.run_all("transformers", [(2, 1), (1, 2)])
    worst = {key: max(e[key] for e in errors) for key in errors[0]}
    assert "u2r1/3-heads/ring-fallback" in worst and "u2r1/batch2/ulysses" in worst and "u1r2/batch2/ring" in worst
    bad = {key: value for key, value in worst.items() if not value <= TOL}
    assert not bad, f"rel-L2 above {TOL}: {bad} (all: {worst})"


@pytest.mark.pool
@pytest.mark.parametrize("system_name", ["cpu-sp2", "cpu-ring2"])
def test_sp_denoise_in_the_pool_worker_matches_one_process(sd3_pool, stages, system_name):
    """The pool's DenoiseWorker (cpu-sp2 / cpu-ring2 layouts): a CFG request at 128x96 (48 image + 109 text
    tokens, odd) equals the in-process denoise within TOL, and decodes to the same image within one level."""
    embeddings = stages["text_encoder"].encode("a red circle", "blurry")
    params = user_params(height=128, width=96, steps=3, seed=5)
    expected = stages["denoiser"].denoise(embeddings, params)
    args = (embeddings.prompt_embeds.numpy(), embeddings.pooled_prompt_embeds.numpy(), params)
    (latents0, _), (latents1, _) = sd3_pool.run_all("denoise", system_name, *args)
    assert torch.equal(latents0, latents1)  # every rank returns the full prediction
    assert rel_l2(latents0, expected) <= TOL
    diff = np.abs(stages["decoder"].decode(latents0).astype(int) - stages["decoder"].decode(expected).astype(int))
    assert diff.max() <= 1


@pytest.mark.pool
def test_sp_cache_ranks_take_one_decision_and_cfg_parallel_matches(sd3_pool, stages):
    embeddings = stages["text_encoder"].encode("a red circle", "blurry")
    args = (embeddings.prompt_embeds.numpy(), embeddings.pooled_prompt_embeds.numpy())
    cached = dataclasses.replace(user_params(steps=8, seed=2), cache_ratio=1.0)
    (_, stats0), (_, stats1) = sd3_pool.run_all("denoise", "cpu-sp2", *args, cached)
    assert stats0["cache_schedule"] == stats1["cache_schedule"] and "S" in stats0["cache_schedule"]["cfg"]
    params = user_params(steps=3, seed=3)
    (cfg0, _), (cfg1, _) = sd3_pool.run_all("denoise", "cpu", *args, params, cfg=True)
    assert torch.equal(cfg0, cfg1)
    assert rel_l2(cfg0, stages["denoiser"].denoise(embeddings, params)) <= TOL


# --------------------------------------------------------------------------------------------
# A real tritonserver serving tiny-sd3 alone (unprefixed names, as `make serve MODEL=tiny-sd3`)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd3_server(tiny_sd3, tmp_path_factory):
    with serving(["tiny-sd3"], tmp_path_factory.mktemp("sd3_server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_sd3):
    case = {k: v for k, v in CASE.items() if k != "prompt"}
    return sd3_reference(tiny_sd3, CASE["prompt"], **case)[0]


def client_for(server, protocol: str) -> SmartDiffusionClient:
    return SmartDiffusionClient(server.http_url if protocol == "http" else server.grpc_url, protocol)


@pytest.mark.server
@pytest.mark.parametrize(
    "protocol,model", [("http", "smart_diffusion"), ("grpc", "smart_diffusion"), ("http", "smart_diffusion_ensemble")]
)
def test_served_image_is_bit_identical_to_sd3_pipeline(sd3_server, reference, protocol, model):
    with client_for(sd3_server, protocol) as client:
        result = client.infer(Request(**CASE), model=model)
    assert result.pixels.shape == (1, 64, 80, 3)
    np.testing.assert_array_equal(result.image, reference)
    assert result.stats["seed"] == CASE["seed"] and result.stats["params"]["guidance_scale"] == 4.5
    assert set(result.stats["stages_ms"]) == {"text_encoder", "denoiser", "vae_decoder"}


@pytest.mark.server
def test_stream_reports_every_step_then_the_image(sd3_server, reference):
    seen = []
    with client_for(sd3_server, "grpc") as client:
        result = client.stream(Request(**CASE), on_progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(result.image, reference)


@pytest.mark.server
def test_served_defaults_num_images_and_cache(sd3_server, tiny_sd3):
    """Defaults (CFG with the empty negative prompt), NUM_IMAGES 2 bit-exact, CACHE_RATIO reported in STATS."""
    with client_for(sd3_server, "http") as client:
        default = client.generate("a cat", seed=3)
        two = client.generate("a cat", seed=3, num_images=2, steps=2)
        cached = client.generate("a cat", seed=3, steps=8, cache_ratio=1.0)
    assert default.pixels.shape == (1, 64, 64, 3) and default.stats["steps"] == tiny_sd3.default_steps
    expected = sd3_reference(tiny_sd3, "a cat", height=64, width=64, steps=tiny_sd3.default_steps,
                             guidance_scale=tiny_sd3.default_guidance_scale, seed=3)
    np.testing.assert_array_equal(default.pixels, expected)
    expected_two = sd3_reference(tiny_sd3, "a cat", height=64, width=64, steps=2,
                                 guidance_scale=tiny_sd3.default_guidance_scale, seed=3, num_images=2)
    np.testing.assert_array_equal(two.pixels, expected_two)
    cache = cached.stats["cache"]
    assert cache["cache_policy"] == "teacache" and cache["cache_block_evals"] < cache["cache_block_evals_total"]


@pytest.mark.server
@pytest.mark.parametrize("model", ["smart_diffusion", "smart_diffusion_ensemble"])
def test_bad_inputs_are_invalid_arg_naming_the_field(sd3_server, model):
    with client_for(sd3_server, "grpc") as client:
        for change, fragment in ((dict(height=72), "HEIGHT: 72 is not a multiple of 16"),
                                 (dict(num_images=5), "NUM_IMAGES"), (dict(guidance_scale=25.0), "GUIDANCE_SCALE")):
            with pytest.raises(GenerationError) as err:
                client.infer(Request(prompt="a cat", seed=1, **change), model=model)
            assert fragment in str(err.value), (change, str(err.value))
