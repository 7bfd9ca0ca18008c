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
