"""Image conditioning through the denoiser's worker pool: Flux image-to-image and inpainting (tiny-flux),
Flux Kontext (tiny-flux-kontext) and Wan image-to-video (tiny-wan-i2v) on 2 gloo ranks give the one-process
stage's latents within the pool tests' tolerance, under Ulysses 2, Ring 2 and (Wan I2V, which runs CFG)
CFG-parallel 2.

One pool of two ranks serves every case: each job sets the layout's process groups, loads the model into a
DenoiseWorker (the pool's own rank code) and runs the request through its `denoise`. The job's arguments
are the ones PooledDenoiser.denoise builds from the request's Embeddings, so the parent's packing of the
conditioning and the ranks' unpacking are both the pool's code. Last, a real tritonserver on cpu-sp2
serves tiny-flux image-to-image and gives the one-rank image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from smart_diffusion_backend.families import Embeddings, load_stage
from smart_diffusion_backend.params import ModelParams, SystemParams, UserParams

from .conftest import ensure_tiny_model
from .reference import rel_l2

TOL = 1e-5  # rel-L2 in float32, as the other pool tests (tests/test_sd3.py, tests/test_denoiser_options.py)

_rng = np.random.default_rng(0)
IMAGE = _rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)
IMAGE[16:48, 8:40] = (220, 30, 30)
MASK = np.zeros((80, 72), np.uint8)
MASK[20:60, 10:50] = 255
# Kontext's reference at 48x56 (rounded to 48x48: 9 tokens): 32 text + 16 image + 9 reference = 57 tokens,
# odd, so the last rank's chunk is padded, and the reference tokens and their ids sit on rank 1 only.
REFERENCE = np.random.default_rng(1).integers(0, 256, (48, 56, 3), dtype=np.uint8)

FLUX = dict(prompt="a red circle on a blue background", negative="", height=64, width=96, steps=4, guidance=3.5, seed=7)
KONTEXT = dict(prompt="make the square blue", negative="", height=64, width=64, steps=3, guidance=2.5, seed=11)
WAN_I2V = dict(prompt="two blue squares", negative="blurry, static", height=48, width=80, steps=2, guidance=4.5,
               seed=123456789, num_frames=5)

CASES = {  # name: (model, request, its image fields)
    "flux-img2img": ("tiny-flux", FLUX, dict(input_image=IMAGE, strength=0.6)),
    "flux-inpaint": ("tiny-flux", FLUX, dict(input_image=IMAGE, mask_image=MASK, strength=0.7)),
    "flux-kontext": ("tiny-flux-kontext", KONTEXT, dict(input_image=REFERENCE)),
    "wan-i2v": ("tiny-wan-i2v", WAN_I2V, dict(input_image=IMAGE)),
}
ULYSSES2, RING2, CFG2 = (2, 1, 1), (1, 2, 1), (1, 1, 2)  # (ulysses, ring, cfg) degrees


def user_params(case: dict, **image) -> UserParams:
    return UserParams(case["prompt"], case["negative"], case["height"], case["width"], case["steps"], case["guidance"],
                      0.0, case["seed"], case.get("num_frames"), **image)


class _Rank:
    def __init__(self, ctx):
        self.ctx = ctx

    def denoise(self, model_name: str, layout: tuple[int, int, int], *job):
        """One pool job (the arguments of PooledDenoiser's "denoise") on a DenoiseWorker of this layout."""
        from smart_diffusion_backend.parallel import parallel_state as ps
        from smart_diffusion_backend.parallel.denoise_worker import DenoiseWorker

        u, r, c = layout
        parallel = ps.set_parallel_degrees(ulysses_degree=u, ring_degree=r, cfg_degree=c)
        system = dataclasses.replace(SystemParams.load("cpu-sp2"), ulysses_degree=u, ring_degree=r, cfg_degree=c)
        worker = DenoiseWorker(dataclasses.replace(self.ctx, parallel=parallel), ModelParams.load(model_name), system)
        try:
            return worker.denoise(*job)
        finally:
            if hasattr(worker, "sp_handle"):
                worker.sp_handle.remove()


def _init_rank(ctx):
    torch.set_num_threads(1)
    return _Rank(ctx)


class _LayoutPool:
    """What PooledDenoiser calls `pool`: its job goes to the module's pool with the model and layout first;
    every rank must return the same latents."""

    def __init__(self, pool, model_name: str, layout: tuple[int, int, int]):
        self.pool, self.model_name, self.layout = pool, model_name, layout

    def execute(self, method, args, kwargs=None, *, cancel_check=None):
        results = self.pool.execute(method, (self.model_name, self.layout, *args), kwargs, collect="all")
        assert all(torch.equal(latents, results[0][0]) for latents, _ in results)
        return results[0]


def pooled_denoiser(pool, model_name: str, layout: tuple[int, int, int]):
    from smart_diffusion_backend.parallel.denoise_worker import PooledDenoiser

    pooled = object.__new__(PooledDenoiser)  # the parent's side of the pool, on the module's workers
    pooled.lora_adapters = ()
    pooled.pool = _LayoutPool(pool, model_name, layout)
    return pooled


@pytest.fixture(scope="module")
def models(tiny_flux):
    return {"tiny-flux": tiny_flux, "tiny-flux-kontext": ensure_tiny_model("tiny-flux-kontext"), "tiny-wan-i2v": ensure_tiny_model("tiny-wan-i2v")}


@pytest.fixture(scope="module")
def pool(models):
    from smart_diffusion_backend.parallel import WorkerPool
    from smart_diffusion_backend.parallel.parallel_state import ParallelConfig

    pool = WorkerPool(2, _init_rank, parallel=ParallelConfig(ulysses_degree=2), num_threads=1,
                      start_timeout_s=180, step_timeout_s=300)
    pool.start()
    yield pool
    pool.shutdown()


_STAGES: dict = {}


def one_rank(models, cpu_system, name: str) -> tuple[Embeddings, UserParams, torch.Tensor]:
    """(the request's Embeddings with its conditioning, its params, the one-process stage's latents)."""
    if name not in _STAGES:
        model_name, case, image = CASES[name]
        encoder = load_stage("text_encoder", models[model_name], cpu_system)
        denoiser = load_stage("denoiser", models[model_name], cpu_system)
        params = user_params(case, **image)
        embeddings = encoder.encode(params.prompt, params.negative_prompt or None)
        conditioning = encoder.encode_conditioning(params)
        embeddings = dataclasses.replace(embeddings, **{k.lower(): v for k, v in conditioning.items()})
        _STAGES[name] = embeddings, params, denoiser.denoise(embeddings, params)
    return _STAGES[name]


@pytest.mark.pool
@pytest.mark.parametrize("name,layout", [
    ("flux-img2img", ULYSSES2), ("flux-img2img", RING2),
    ("flux-inpaint", ULYSSES2), ("flux-inpaint", RING2),
    ("flux-kontext", ULYSSES2), ("flux-kontext", RING2),
    ("wan-i2v", ULYSSES2), ("wan-i2v", RING2), ("wan-i2v", CFG2),
], ids=lambda v: {ULYSSES2: "ulysses2", RING2: "ring2", CFG2: "cfg2"}.get(v, v))
def test_pooled_denoise_with_image_conditioning_equals_one_rank(pool, models, cpu_system, name, layout):
    embeddings, params, expected = one_rank(models, cpu_system, name)
    present = {k for k in ("image_latents", "mask_latents", "image_embeds") if getattr(embeddings, k) is not None}
    assert present == {"flux-img2img": {"image_latents"}, "flux-inpaint": {"image_latents", "mask_latents"},
                       "flux-kontext": {"image_latents"},
                       "wan-i2v": {"image_latents", "mask_latents", "image_embeds"}}[name]
    latents, _ = pooled_denoiser(pool, CASES[name][0], layout).denoise(embeddings, params, None)
    assert latents.shape == expected.shape
    assert rel_l2(latents, expected) <= TOL


@pytest.mark.pool
def test_kontext_without_its_reference_differs_in_the_pool(pool, models, cpu_system):
    """The reference tokens matter to the pooled result: without them it is Kontext's text-to-image."""
    embeddings, params, expected = one_rank(models, cpu_system, "flux-kontext")
    text_only = dataclasses.replace(embeddings, image_latents=None)
    latents, _ = pooled_denoiser(pool, "tiny-flux-kontext", ULYSSES2).denoise(text_only, params, None)
    assert rel_l2(latents, expected) > 1e-2


# --------------------------------------------------------------------------------------------
# A real tritonserver whose denoiser is a 2-rank pool (cpu-sp2), serving tiny-flux image-to-image
# --------------------------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.pool
def test_served_img2img_on_two_ranks_is_the_one_rank_image(tiny_flux, tmp_path):
    """The one-rank image is FluxImg2ImgPipeline's, bit for bit (tests/test_flux_conditioning.py serves it);
    the pool's, within one uint8 level of it (as tests/test_pool_server.py for text-to-image)."""
    from smart_diffusion_backend.repository import write_repository
    from smart_diffusion_client import Request, SmartDiffusionClient

    from .conftest import start_server, stop_server_and_check
    from .test_flux_conditioning import conditioning_reference

    case = dict(prompt=FLUX["prompt"], height=FLUX["height"], width=FLUX["width"], steps=FLUX["steps"],
                guidance_scale=FLUX["guidance"], seed=FLUX["seed"])
    write_repository(tmp_path / "repo", ["tiny-flux"], "cpu-sp2")
    server, shm_before = start_server(tmp_path / "repo", tmp_path)
    try:
        with SmartDiffusionClient(server.http_url) as client:
            result = client.infer(Request(**case, input_image=IMAGE, strength=0.6))
    finally:
        stop_server_and_check(server, shm_before)
    assert result.stats["ranks"] == 2
    reference = conditioning_reference(tiny_flux, **case, image=IMAGE, strength=0.6)
    assert result.image.shape == reference.shape[1:]
    diff = np.abs(result.image.astype(int) - reference[0].astype(int))
    assert diff.max() <= 1, f"max |diff| {diff.max()} uint8 levels vs the one-rank image"
