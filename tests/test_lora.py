"""Per-request LoRA (smart_diffusion_backend/lora.py, docs/lora.md) on CPU.

Small adapters are built in code (diffusers/PEFT-format safetensors, random low-rank matrices) for tiny-flux
and a tiny Wan transformer; the committed shapes-flux adapters are checked with the pixel analyser. The
reference is diffusers' own unfused PEFT path: `FluxPipeline.load_lora_weights` + `set_adapters`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from smart_diffusion_backend.errors import ConfigError, ParamError
from smart_diffusion_backend.families import load_stage
from smart_diffusion_backend.lora import LoraLinear, LoraSection, LoraSet, adapter_files, read_adapter, resident_names
from smart_diffusion_backend.params import ModelParams, SystemParams, UserParams

from .reference import flux_reference, rel_l2

ROOT = Path(__file__).resolve().parent.parent
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                "proj_mlp", "proj_out", "norm1.linear", "x_embedder")


def write_adapter(path: Path, transformer: torch.nn.Module, targets: tuple[str, ...], rank: int, seed: int, *,
                  alpha: float | None = None, metadata_alpha: float | None = None, prefix: str = "transformer.",
                  std: float = 0.3) -> Path:
    """A LoRA file as diffusers writes it: `transformer.<module>.lora_A/B.weight`, alpha as `<module>.alpha`
    keys (kohya-converted style) or as lora_adapter_metadata (save_lora_weights style), or none (scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * std
            tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * std
            if alpha is not None:
                tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    metadata = {"format": "pt"}
    if metadata_alpha is not None:
        metadata["lora_adapter_metadata"] = json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": metadata_alpha, "transformer.target_modules": list(targets)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def with_loras(model: ModelParams, directory: Path, **section) -> ModelParams:
    accepts = tuple(dict.fromkeys(model.accepts + ("LORA", "LORA_SCALE")))
    return dataclasses.replace(model, accepts=accepts, lora={"dir": str(directory), "max_per_request": 3, **section})


def params(prompt: str = "a red circle", lora: dict[str, float] | None = None, **kw) -> UserParams:
    lora = lora or {}
    values = dict(height=64, width=64, steps=3, guidance_scale=3.5, cache_ratio=0.0, seed=1)
    values.update(kw)
    return UserParams(prompt, "", **values, lora=tuple(lora), lora_scale=tuple(lora.values()))


# Requests of the mixing tests: none, one adapter at scale 1 and at another scale, both with mixed signs.
SELECTIONS = ({}, {"pastel": 1.0}, {"sketch": 0.6}, {"pastel": -0.5, "sketch": 1.5})


@pytest.fixture(scope="module")
def flux_adapters(tiny_flux, tmp_path_factory) -> Path:
    """Two tiny-flux adapters: `pastel` (rank 4, no alpha: scale 1), `sketch` (rank 2, alpha 4 in the metadata:
    scale 2, also on the modulation and the embedder)."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux.weights, subfolder="transformer")
    directory = tmp_path_factory.mktemp("flux-loras")
    write_adapter(directory / "pastel.safetensors", transformer, FLUX_TARGETS[:9], rank=4, seed=1)
    write_adapter(directory / "sketch" / "pytorch_lora_weights.safetensors", transformer,
                  ("to_q", "to_v", "add_q_proj", "norm1.linear", "x_embedder", "proj_out"), rank=2, seed=2,
                  metadata_alpha=4.0)
    return directory


@pytest.fixture(scope="module")
def lora_model(tiny_flux, flux_adapters) -> ModelParams:
    return with_loras(tiny_flux, flux_adapters)


@pytest.fixture(scope="module")
def stages(lora_model, cpu_system):
    return {kind: load_stage(kind, lora_model, cpu_system) for kind in ("text_encoder", "denoiser", "decoder")}


@pytest.fixture(scope="module")
def embeddings(stages):
    return stages["text_encoder"].encode("a red circle", None)


@pytest.fixture(scope="module")
def peft_pipe(tiny_flux, flux_adapters):
    """diffusers' FluxPipeline with both adapters loaded by its own PEFT path (unfused)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux.weights)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(flux_adapters / "pastel.safetensors"), adapter_name="pastel")
    pipe.load_lora_weights(str(flux_adapters / "sketch"), adapter_name="sketch")
    return pipe


def peft_latents(pipe, model: ModelParams, p: UserParams) -> torch.Tensor:
    from diffusers import FluxPipeline

    pipe.set_adapters(list(p.lora), list(p.lora_scale))
    packed = pipe(p.prompt, height=p.height, width=p.width, num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(p.seed), max_sequence_length=model.max_sequence_length,
                  output_type="latent").images
    return FluxPipeline._unpack_latents(packed, p.height, p.width, 8)


# --------------------------------------------------------------------------------------------
# Files and the yaml section
# --------------------------------------------------------------------------------------------


def test_adapter_files_scales_and_refusals(tmp_path, flux_adapters):
    from diffusers import FluxTransformer2DModel

    assert list(adapter_files(flux_adapters)) == ["pastel", "sketch"]  # a file and a folder
    pastel = read_adapter("pastel", flux_adapters / "pastel.safetensors")
    sketch = read_adapter("sketch", flux_adapters / "sketch" / "pytorch_lora_weights.safetensors")
    assert {m.scaling for m in pastel.modules.values()} == {1.0}  # no alpha: alpha = r, as diffusers
    assert {m.scaling for m in sketch.modules.values()} == {2.0}  # metadata lora_alpha 4 / r 2
    assert (0, "transformer_blocks.0.attn.to_q") in pastel.modules

    transformer = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    keyed = read_adapter("k", write_adapter(tmp_path / "k.safetensors", transformer, ("to_q",), 4, 0, alpha=2.0))
    assert {m.scaling for m in keyed.modules.values()} == {0.5}  # <module>.alpha keys: alpha / r
    bare = read_adapter("b", write_adapter(tmp_path / "b.safetensors", transformer, ("to_q",), 2, 0, prefix=""))
    assert (0, "transformer_blocks.0.attn.to_q") in bare.modules  # keys without the component prefix
    rslora = tmp_path / "rs.safetensors"
    write_adapter(rslora, transformer, ("to_q",), 4, 0)
    from safetensors import safe_open
    from safetensors.torch import load_file

    save_file(load_file(str(rslora)), str(rslora), metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": True,
         "transformer.alpha_pattern": {"single_transformer_blocks.0.attn.to_q": 2}})})
    with safe_open(str(rslora), framework="pt") as f:
        assert "lora_adapter_metadata" in f.metadata()
    scalings = {k[1]: m.scaling for k, m in read_adapter("rs", rslora).modules.items()}
    assert scalings["transformer_blocks.0.attn.to_q"] == 8 / 2  # alpha / sqrt(r)
    assert scalings["single_transformer_blocks.0.attn.to_q"] == 2 / 2  # alpha_pattern wins for its module

    def refused(tensors: dict, match: str, metadata: dict | None = None) -> None:
        path = tmp_path / "bad.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ConfigError, match=match):
            read_adapter("bad", path)

    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    refused({"text_encoder.x.lora_A.weight": a, "text_encoder.x.lora_B.weight": b}, "only transformer LoRAs")
    refused({"transformer.x.lora_down.weight": a}, "not a diffusers/PEFT LoRA key")
    refused({"transformer.x.lora_A.weight": a}, "only one of lora_A / lora_B")
    refused({"transformer.x.lora_A.weight": a, "transformer.x.lora_B.weight": b,
             "transformer.x.lora_magnitude_vector": torch.zeros(8)}, "DoRA")
    refused({"transformer.x.lora_A.weight": a, "transformer.x.lora_B.weight": torch.zeros(8, 3)}, "one rank")


def test_yaml_section_and_resident_set(tiny_flux, tmp_path, flux_adapters):
    assert resident_names(with_loras(tiny_flux, flux_adapters)) == ("pastel", "sketch")
    assert resident_names(with_loras(tiny_flux, flux_adapters, preload=["sketch"])) == ("sketch",)
    assert resident_names(with_loras(tiny_flux, tmp_path / "missing")) == ()  # nothing there: none resident
    with pytest.raises(ConfigError, match="exceed max_resident 1"):
        resident_names(with_loras(tiny_flux, flux_adapters, max_resident=1))
    with pytest.raises(ConfigError, match=r"preload names \['nope'\]"):
        resident_names(with_loras(tiny_flux, flux_adapters, preload=["nope"]))
    with pytest.raises(ConfigError, match="unknown keys"):
        LoraSection.of(with_loras(tiny_flux, flux_adapters, merge=True))
    no_accept = dataclasses.replace(tiny_flux, accepts=("NUM_IMAGES",), lora={"dir": str(flux_adapters)})
    with pytest.raises(ConfigError, match="needs LORA"):
        LoraSection.of(no_accept)
    with pytest.raises(ConfigError, match="needs a `lora:` section"):
        LoraSection.of(dataclasses.replace(tiny_flux, accepts=("LORA",), lora={}))
    for name in ("shapes-flux", "tiny-flux"):  # the committed yamls accept LORA and have a section
        model = ModelParams.load(name)
        assert model.takes("LORA") and model.takes("LORA_SCALE") and LoraSection.of(model) is not None


# --------------------------------------------------------------------------------------------
# The denoiser stage: exactness, mixing, isolation
# --------------------------------------------------------------------------------------------


def test_no_lora_is_bit_identical_to_the_pipeline_without_adapters(tiny_flux, stages, embeddings):
    denoiser = stages["denoiser"]
    assert denoiser.lora_adapters == ("pastel", "sketch")
    assert sum(isinstance(m, LoraLinear) for m in denoiser.transformer.modules()) == len(denoiser.loras.layers) > 10
    p = params()
    image = stages["decoder"].decode(denoiser.denoise(embeddings, p))[0]
    reference = flux_reference(tiny_flux, p.prompt, height=64, width=64, steps=3, guidance_scale=3.5, seed=1)
    np.testing.assert_array_equal(image, reference)


def test_each_selection_matches_diffusers_peft(lora_model, stages, embeddings, peft_pipe):
    """One adapter at scale 1: bit-identical to diffusers' unfused PEFT path (same GEMMs); other scales and
    mixes: within float32 rounding (the scale is applied between the two GEMMs, the adapters summed in one)."""
    denoiser = stages["denoiser"]
    plain = denoiser.denoise(embeddings, params())
    for selection in SELECTIONS[1:]:
        p = params(lora=selection)
        out = denoiser.denoise(embeddings, p)
        reference = peft_latents(peft_pipe, lora_model, p)
        assert rel_l2(out, reference) <= 1e-6, selection
        assert rel_l2(out, plain) > 0.05, selection  # the adapter really acts
        if selection == {"pastel": 1.0}:
            assert torch.equal(out, reference)


def test_unknown_adapters_are_invalid_arg_listing_the_resident_ones(tiny_flux, lora_model, cpu_system, stages, embeddings):
    with pytest.raises(ParamError, match=r"LORA: unknown adapter 'nope'; resident adapters: pastel, sketch"):
        stages["denoiser"].denoise(embeddings, params(lora={"pastel": 1.0, "nope": 1.0}))
    # the service: a LORA request tensor through parse and denoise, INVALID_ARG before any step
    from smart_diffusion_backend.service import DenoiserService

    service = DenoiserService(dataclasses.replace(lora_model, accepts=("LORA", "LORA_SCALE")), cpu_system)
    inputs = {"PROMPT_EMBEDS": embeddings.prompt_embeds.numpy(), "POOLED_PROMPT_EMBEDS": embeddings.pooled_prompt_embeds.numpy(),
              "LORA": np.array([b"nope"], dtype=np.object_), "STEPS": np.array([2], np.int32)}
    with pytest.raises(ParamError, match="LORA: unknown adapter 'nope'"):
        service(inputs)
    inputs["LORA"] = np.array([b"sketch"], dtype=np.object_)
    inputs["LORA_SCALE"] = np.array([0.5], np.float32)
    stats = json.loads(service(inputs)["STATS"][0])
    assert stats["params"]["lora"] == ["sketch"] and stats["params"]["lora_scale"] == [0.5]
    # a model without adapters refuses every name
    plain = load_stage("denoiser", tiny_flux, cpu_system)
    with pytest.raises(ParamError, match="resident adapters: none"):
        plain.denoise(embeddings, params(lora={"pastel": 1.0}))


def test_concurrent_requests_in_threads_never_see_each_others_adapters(stages, embeddings):
    """The selection lives in a thread-local set around each request's denoise: threads running different
    adapters (and none) through the same layers at once each get their solo result, bit for bit."""
    denoiser = stages["denoiser"]
    solo = [denoiser.denoise(embeddings, params(lora=s)) for s in SELECTIONS]
    jobs = [i for i in range(len(SELECTIONS)) for _ in range(2)]
    random.Random(0).shuffle(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> tuple[int, torch.Tensor]:
        barrier.wait()
        return i, denoiser.denoise(embeddings, params(lora=SELECTIONS[i]))

    with ThreadPoolExecutor(len(jobs)) as pool:
        for i, out in pool.map(run, jobs):
            assert torch.equal(out, solo[i]), SELECTIONS[i]
    assert denoiser.loras.state.scales is None  # nothing left behind in this thread


def test_compiled_blocks_never_recompile_for_another_adapter_or_scale(lora_model, cpu_system, stages, embeddings, monkeypatch):
    """compile_transformer: the warm-up compiles the blocks with and without a LoRA term; then requests that
    switch adapters and scales (and back to none) compile nothing more. aot_eager keeps this fast: the
    recompile decision is dynamo's guards, the same with inductor."""
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = load_stage("denoiser", lora_model, dataclasses.replace(cpu_system, compile_transformer=True))
    assert compiled.compile_seconds is not None
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    eager = stages["denoiser"]
    for selection in (*SELECTIONS, {"sketch": -1.0}, {"pastel": 0.25, "sketch": 0.75}, {}):
        p = params(lora=selection, steps=2)
        assert rel_l2(compiled.denoise(embeddings, p), eager.denoise(embeddings, p)) <= 1e-6, selection
    assert counters["stats"]["unique_graphs"] == graphs, "a request recompiled the blocks"


def test_fp8_linear_keeps_the_lora_term_beside_the_e4m3_gemm(tiny_flux, tmp_path):
    """fp8_linear then LoRA: the term runs in the stage dtype beside each Fp8Linear, including the GELU MLPs whose
    bias and GELU fp8 moved into the second layer's input quantisation (ff.net.0.proj is then ff.net.0)."""
    from smart_diffusion_backend.quant import Fp8Linear, quantize_linears

    from .test_attention_backends import tiny_flux as tiny_transformer

    model, _ = tiny_transformer()
    directory = tmp_path / "fp8-loras"
    write_adapter(directory / "mlp.safetensors", model, ("to_q", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"), 4, 3)
    lora_model = with_loras(tiny_flux, directory)
    outputs = {}
    for kind in ("float", "fused", "unfused"):
        transformer, inputs = tiny_transformer()
        if kind != "float":
            quantize_linears(transformer, quantisation_kernel=kind == "fused")
        loras = LoraSet.load(lora_model, [transformer], torch.device("cpu"), torch.float32)
        if kind == "fused":
            assert isinstance(transformer.transformer_blocks[0].ff.net[0].base, Fp8Linear)  # the folded wrapper
            assert transformer.transformer_blocks[0].ff.net[2].base.input_gelu_bias is not None
        with torch.inference_mode():
            base = transformer(**inputs)[0]
            with loras.scope(("mlp",), (1.0,)):
                outputs[kind] = (base, transformer(**inputs)[0])
    fused, unfused, exact = outputs["fused"][1], outputs["unfused"][1], outputs["float"][1]
    assert rel_l2(fused, unfused) <= 1e-5  # the fused MLP gets the same LoRA term as the unfused one
    delta_fp8 = outputs["fused"][1] - outputs["fused"][0]
    delta_float = outputs["float"][1] - outputs["float"][0]
    assert rel_l2(delta_fp8, delta_float) <= 0.1  # the LoRA's effect survives e4m3 within its error
    assert rel_l2(fused, exact) <= 0.1


def test_wan_transformers_take_the_same_adapters_as_peft(tmp_path, tiny_flux):
    """Nothing is Flux-specific: a Wan transformer with an adapter equals diffusers' load_lora_adapter on it."""
    from .test_attention_backends import tiny_wan

    model, inputs = tiny_wan()
    path = write_adapter(tmp_path / "wan" / "motion.safetensors", model, ("to_q", "to_k", "to_out.0", "ffn.net.0.proj",
                                                                           "ffn.net.2", "proj_out"), 4, 5, alpha=8.0)
    reference, _ = tiny_wan()
    from safetensors.torch import load_file

    state = load_file(str(path))  # as WanPipeline.lora_state_dict hands it over: alphas apart
    alphas = {k: state.pop(k) for k in list(state) if k.endswith(".alpha")}
    reference.load_lora_adapter(state, network_alphas=alphas, adapter_name="motion", prefix="transformer")
    reference.set_adapters(["motion"], [0.7])
    loras = LoraSet.load(with_loras(tiny_flux, path.parent), [model], torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        expected = reference(**inputs)[0]
        with loras.scope(("motion",), (0.7,)):
            out = model(**inputs)[0]
    assert rel_l2(out, expected) <= 1e-6


# --------------------------------------------------------------------------------------------
# The worker pool
# --------------------------------------------------------------------------------------------


@pytest.mark.pool
def test_pool_loads_the_same_adapters_on_every_rank_and_applies_each_request(lora_model, stages, embeddings):
    from smart_diffusion_backend.parallel.denoise_worker import PooledDenoiser

    pool = PooledDenoiser(lora_model, SystemParams.load("cpu-sp2"))
    try:
        assert pool.lora_adapters == ("pastel", "sketch")
        assert pool.pool.run_all("lora_adapters") == [("pastel", "sketch")] * 2
        for selection in SELECTIONS:
            p = params(lora=selection, steps=2)
            latents, _ = pool.denoise(embeddings, p, None)
            assert rel_l2(latents, stages["denoiser"].denoise(embeddings, p)) <= 1e-5, selection
        starts = pool.pool.starts
        with pytest.raises(ParamError, match="LORA: unknown adapter 'nope'; resident adapters: pastel, sketch"):
            pool.denoise(embeddings, params(lora={"nope": 1.0}), None)
        assert pool.pool.starts == starts  # refused before the job: the pool did not restart
    finally:
        pool.close()


# --------------------------------------------------------------------------------------------
# The committed shapes-flux adapters
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(cpu_system):
    model = ModelParams.load("shapes-flux")
    return model, {kind: load_stage(kind, model, cpu_system) for kind in ("text_encoder", "denoiser", "decoder")}


def test_blue_shift_turns_red_blue_and_leaves_the_rest(shapes):
    from smart_diffusion_backend.training.analyser import analyse

    model, s = shapes
    assert s["denoiser"].lora_adapters == ("blue-shift", "dark-background")
    files = [p for p in (ROOT / "models" / "shapes-flux-loras").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000

    def draw(prompt: str, lora: dict[str, float] | None = None, seed: int = 0):
        p = UserParams(prompt, "", 64, 64, 20, 3.5, 0.0, seed, lora=tuple(lora or {}), lora_scale=tuple((lora or {}).values()))
        return analyse(s["decoder"].decode(s["denoiser"].denoise(s["text_encoder"].encode(prompt, None), p))[0])

    red = "a red circle on a gray background, center"
    assert draw(red).color == "red"
    assert draw(red, {"blue-shift": 1.0}).color == "blue"
    assert draw("a red square on a white background, top left", {"blue-shift": 1.0}).color == "blue"
    assert draw("a green triangle on a gray background, center", {"blue-shift": 1.0}).color == "green"
    dark = draw(red, {"blue-shift": 1.0, "dark-background": 1.0})
    assert (dark.color, dark.background) == ("blue", "black")


def test_committed_adapter_is_what_diffusers_loads(shapes):
    """blue-shift through diffusers' own load_lora_weights / set_adapters gives our latents at scale 0.8."""
    from diffusers import FluxPipeline

    model, s = shapes
    pipe = FluxPipeline.from_pretrained(model.weights)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(ROOT / "models" / "shapes-flux-loras" / "blue-shift.safetensors"), adapter_name="blue-shift")
    p = UserParams("a red square on a gray background, center", "", 64, 64, 4, 3.5, 0.0, 3, lora=("blue-shift",),
                   lora_scale=(0.8,))
    ours = s["denoiser"].denoise(s["text_encoder"].encode(p.prompt, None), p)
    assert rel_l2(ours, peft_latents(pipe, model, p)) <= 1e-6


def test_training_script_smoke(tmp_path, monkeypatch):
    """Two steps of scripts/train_shapes_lora.py write a file our reader and diffusers both load."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_shapes_lora", ROOT / "scripts" / "train_shapes_lora.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    record = script.train_adapter("blue-shift", steps=2, batch=2, lr=1e-3, rank=2, n_images=8, seed=0, out_dir=tmp_path,
                                  log=lambda _: None)
    adapter = read_adapter("blue-shift", tmp_path / "blue-shift.safetensors")
    assert record["layers"] == len(adapter.modules) > 20
    assert {m.rank for m in adapter.modules.values()} == {2}


# --------------------------------------------------------------------------------------------
# Served: a real tritonserver
# --------------------------------------------------------------------------------------------


@pytest.fixture
def lora_server(tiny_flux, flux_adapters, tmp_path):
    """tiny-flux with the two adapters in a directory of its own, explicit model control (so the denoiser can be
    reloaded). One server per test: the reload test adds an adapter to the directory, which the other test's
    list of resident adapters must not see."""
    import yaml

    from .conftest import serving

    directory = tmp_path / "loras"
    shutil.copytree(flux_adapters, directory)
    raw = yaml.safe_load((ROOT / "configs" / "models" / "tiny-flux.yaml").read_text())
    raw["lora"] = {**raw.get("lora", {}), "dir": str(directory), "max_per_request": 3}
    raw["accepts"] = list(dict.fromkeys(raw.get("accepts", []) + ["LORA", "LORA_SCALE"]))
    config = tmp_path / "tiny-flux-lora.yaml"
    config.write_text(yaml.safe_dump(raw))
    with serving([str(config)], tmp_path, model_control_mode="explicit", load_models=("*",)) as server:
        server.lora_dir = directory
        yield server


@pytest.mark.server
def test_served_concurrent_requests_with_different_adapters_equal_their_solo_results(lora_server, tiny_flux):
    from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

    requests = [Request(prompt="a red circle", height=64, width=64, steps=3, guidance_scale=3.5, seed=1,
                        lora=tuple(s) or None, lora_scale=tuple(s.values()) or None) for s in SELECTIONS]

    def run(request):
        with SmartDiffusionClient(lora_server.grpc_url, "grpc") as client:
            return client.infer(request).image

    solo = [run(r) for r in requests]
    reference = flux_reference(tiny_flux, "a red circle", height=64, width=64, steps=3, guidance_scale=3.5, seed=1)
    np.testing.assert_array_equal(solo[0], reference)  # no LoRA: the pipeline without adapters, bit for bit
    assert all(not np.array_equal(solo[0], image) for image in solo[1:])
    jobs = list(range(len(requests))) * 2
    random.Random(1).shuffle(jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        for i, image in zip(jobs, pool.map(lambda i: run(requests[i]), jobs)):
            np.testing.assert_array_equal(image, solo[i])

    # An adapter that is not resident: INVALID_ARG naming LORA and the resident ones, on every entry model
    for protocol, url in (("http", lora_server.http_url), ("grpc", lora_server.grpc_url)):
        with SmartDiffusionClient(url, protocol) as client:
            for model in ("smart_diffusion", "smart_diffusion_ensemble"):
                with pytest.raises(GenerationError) as err:
                    client.infer(Request(prompt="a cat", steps=2, lora=("watercolour",)), model=model)
                assert err.value.status in ("400", 400, "StatusCode.INVALID_ARGUMENT"), (protocol, model, err.value.status)
                assert "LORA: unknown adapter 'watercolour'; resident adapters: pastel, sketch" in str(err.value)
            with pytest.raises(GenerationError, match="LORA_SCALE: 9 is out of range"):
                client.infer(Request(prompt="a cat", lora=("pastel",), lora_scale=(9.0,)))
            assert client.infer(Request(prompt="a cat", steps=2, lora=("sketch",))).image.shape == (64, 64, 3)


@pytest.mark.server
def test_a_denoiser_reload_through_the_repository_api_picks_up_new_adapters(lora_server, tiny_flux):
    """Model control: an explicit load of the denoiser re-reads the adapter directory (no server restart)."""
    import tritonclient.http as httpclient
    from diffusers import FluxTransformer2DModel

    from smart_diffusion_client import GenerationError, Request, SmartDiffusionClient

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux.weights, subfolder="transformer")
    write_adapter(lora_server.lora_dir / "ink.safetensors", transformer, ("to_v", "proj_mlp"), rank=3, seed=9)
    request = Request(prompt="a red circle", height=64, width=64, steps=3, seed=2, lora=("ink",), lora_scale=(1.0,))
    with SmartDiffusionClient(lora_server.http_url, "http") as client:
        with pytest.raises(GenerationError, match="unknown adapter 'ink'"):
            client.infer(request)
        admin = httpclient.InferenceServerClient(lora_server.http_url)
        try:
            admin.load_model("denoiser")  # the ensemble that composes it is reloaded with it
            assert admin.is_model_ready("denoiser") and admin.is_model_ready("smart_diffusion_ensemble")
        finally:
            admin.close()
        with_ink = client.infer(request).image
        plain = client.infer(dataclasses.replace(request, lora=None, lora_scale=None)).image
        assert np.array_equal(client.stream(request).image, with_ink)
        assert np.array_equal(client.infer(request, model="smart_diffusion_ensemble").image, with_ink)
    assert not np.array_equal(with_ink, plain)
    reference = flux_reference(tiny_flux, "a red circle", height=64, width=64, steps=3, guidance_scale=3.5, seed=2)
    np.testing.assert_array_equal(plain, reference)
