"""The committed model_repository is exactly the generator's output; several pipelines get prefixes."""

from __future__ import annotations

from pathlib import Path

from smart_diffusion_backend.repository import (
    ALL_MODELS,
    DEFAULT_MODEL,
    DEFAULT_SYSTEM,
    PipelineEntry,
    model_configs,
    write_repository,
)

ROOT = Path(__file__).resolve().parent.parent


def test_committed_repository_matches_the_generator():
    generated = model_configs(PipelineEntry(DEFAULT_MODEL, ""), DEFAULT_SYSTEM)
    for name in ALL_MODELS:
        committed = (ROOT / "model_repository" / name / "config.pbtxt").read_text()
        assert committed == generated[name], f"model_repository/{name}/config.pbtxt is stale: run make repository"
        assert (ROOT / "model_repository" / name / "1").is_dir()


def test_several_pipelines_get_prefixed_names(tmp_path):
    names = write_repository(tmp_path, ["tiny-flux", "flux1-dev"], "cpu")
    assert "tiny-flux_smart_diffusion" in names and "flux1-dev_denoiser" in names
    bls = (tmp_path / "flux1-dev_smart_diffusion" / "config.pbtxt").read_text()
    assert 'string_value: "flux1-dev_denoiser"' in bls
    ensemble = (tmp_path / "tiny-flux_smart_diffusion_ensemble" / "config.pbtxt").read_text()
    assert 'model_name: "tiny-flux_vae_decoder"' in ensemble
    model_py = (tmp_path / "tiny-flux_denoiser" / "1" / "model.py").read_text()
    assert model_py == (ROOT / "model_repository" / "denoiser" / "1" / "model.py").read_text()


def test_gpu_systems_keep_stage_tensors_on_the_gpu():
    """On a GPU host the stages are GPU instances taking inputs where Triton holds them (no host round
    trip for embeddings and latents); the orchestrators stay CPU relays. CPU systems keep CPU instances."""
    gpu = model_configs(PipelineEntry(DEFAULT_MODEL, ""), "gpu-1")
    for stage in ("text_encoder", "denoiser", "vae_decoder"):
        assert "kind: KIND_GPU gpus: [ 0 ]" in gpu[stage], stage
    for stage in ("denoiser", "vae_decoder"):
        assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" }' in gpu[stage], stage
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in gpu["text_encoder"]  # its inputs are strings
    for orchestrator in ("smart_diffusion", "smart_diffusion_stream"):
        assert "kind: KIND_CPU" in gpu[orchestrator] and "KIND_GPU" not in gpu[orchestrator]
    # CPU systems, and pooled GPU systems (the pool takes and returns host arrays), keep CPU instances.
    for system in ("cpu", "gpu-2"):
        configs = model_configs(PipelineEntry(DEFAULT_MODEL, ""), system)
        assert all("KIND_GPU" not in text and "FORCE_CPU_ONLY" not in text for text in configs.values()), system


def test_model_names_with_dots_keep_their_whole_name_as_prefix(tmp_path):
    from smart_diffusion_backend.repository import pipeline_name

    assert pipeline_name("wan2.1-t2v-1.3b") == "wan2.1-t2v-1.3b" and pipeline_name("configs/x/my.model.yaml") == "my.model"
    names = write_repository(tmp_path, ["tiny-flux", "wan2.1-t2v-1.3b"], "cpu")
    assert "wan2.1-t2v-1.3b_smart_diffusion" in names and "tiny-flux_denoiser" in names
