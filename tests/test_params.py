"""The parameter taxonomy: model/system yaml loading and user-param validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from smart_diffusion_backend.params import (
    ConfigError,
    ModelParams,
    ParamError,
    SystemParams,
    UserParams,
    parse_user_params,
)


def b(text: str | bytes) -> np.ndarray:
    return np.array([text.encode() if isinstance(text, str) else text], dtype=np.object_)


def i32(v) -> np.ndarray:
    return np.array([v], dtype=np.int32)


def f32(v) -> np.ndarray:
    return np.array([v], dtype=np.float32)


@pytest.fixture
def model():
    return ModelParams.load("tiny-flux")


@pytest.fixture
def system():
    return SystemParams.load("cpu")


def test_defaults_come_from_the_model_yaml(model, system):
    params = parse_user_params({"PROMPT": b("a cat")}, model, system)
    assert (params.height, params.width, params.steps) == (model.default_height, model.default_width, model.default_steps)
    assert params.guidance_scale == model.default_guidance_scale
    assert params.cache_ratio == 0.0
    assert 0 <= params.seed < 2**63


def test_explicit_values_are_kept_exactly(model, system):
    params = parse_user_params(
        {"PROMPT": b("a cat"), "HEIGHT": i32(128), "WIDTH": i32(96), "STEPS": i32(3),
         "GUIDANCE_SCALE": f32(1.5), "CACHE_RATIO": f32(0.25), "SEED": np.array([2**62], np.int64)},
        model, system,
    )
    assert params == UserParams("a cat", "", 128, 96, 3, 1.5, 0.25, 2**62)


def test_user_params_are_frozen(model, system):
    params = parse_user_params({"PROMPT": b("x")}, model, system)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.steps = 9  # type: ignore[misc]


BAD_INPUTS = [
    ({}, "PROMPT", "required"),
    ({"PROMPT": b("")}, "PROMPT", "empty"),
    ({"PROMPT": b("   ")}, "PROMPT", "empty"),
    ({"PROMPT": b("x" * 2001)}, "PROMPT", "2001 characters"),
    ({"PROMPT": b(b"\xff\xfe")}, "PROMPT", "UTF-8"),
    ({"PROMPT": np.array([b"a", b"b"], dtype=np.object_)}, "PROMPT", "exactly one"),
    ({"PROMPT": np.array([1], np.int32)}, "PROMPT", "BYTES"),
    ({"NEGATIVE_PROMPT": b("blurry")}, "NEGATIVE_PROMPT", "not supported"),
    ({"HEIGHT": i32(65)}, "HEIGHT", "multiple of 16"),
    ({"HEIGHT": i32(0)}, "HEIGHT", "out of range"),
    ({"WIDTH": i32(-16)}, "WIDTH", "out of range"),
    ({"WIDTH": i32(4096)}, "WIDTH", "[16, 1024]"),
    ({"WIDTH": f32(64.0)}, "WIDTH", "integer"),
    ({"STEPS": i32(0)}, "STEPS", "[1, 50]"),
    ({"STEPS": i32(51)}, "STEPS", "out of range"),
    ({"GUIDANCE_SCALE": f32(float("nan"))}, "GUIDANCE_SCALE", "finite"),
    ({"GUIDANCE_SCALE": f32(float("inf"))}, "GUIDANCE_SCALE", "finite"),
    ({"GUIDANCE_SCALE": f32(-1)}, "GUIDANCE_SCALE", "[0, 20]"),
    ({"CACHE_RATIO": f32(1.5)}, "CACHE_RATIO", "[0, 1]"),
    ({"CACHE_RATIO": f32(-0.1)}, "CACHE_RATIO", "out of range"),
    ({"SEED": np.array([-1], np.int64)}, "SEED", "out of range"),
    ({"NUM_FRAMES": i32(9)}, "NUM_FRAMES", "video models"),
    ({"FOO": i32(1)}, "FOO", "unknown input"),
]


@pytest.mark.parametrize("extra,field,fragment", BAD_INPUTS)
def test_bad_inputs_name_the_field_and_range(model, system, extra, field, fragment):
    inputs = {"PROMPT": b("a cat"), **extra}
    if field == "PROMPT" and "PROMPT" not in extra:
        inputs.pop("PROMPT")
    with pytest.raises(ParamError) as err:
        parse_user_params(inputs, model, system)
    assert err.value.field_name == field
    assert str(err.value).startswith(f"{field}:")
    assert fragment in str(err.value)


def test_max_pixels_is_a_system_budget(model):
    small = dataclasses.replace(SystemParams.load("cpu"), max_pixels_per_request=64 * 64)
    parse_user_params({"PROMPT": b("x"), "HEIGHT": i32(64), "WIDTH": i32(64)}, model, small)
    with pytest.raises(ParamError, match="HEIGHT\\*WIDTH: 64x80 = 5120 pixels exceeds"):
        parse_user_params({"PROMPT": b("x"), "HEIGHT": i32(64), "WIDTH": i32(80)}, model, small)


def test_system_max_steps_caps_the_model_limit(model):
    capped = dataclasses.replace(SystemParams.load("cpu"), max_steps=8)
    with pytest.raises(ParamError, match=r"STEPS: 9 is out of range; allowed \[1, 8\]"):
        parse_user_params({"PROMPT": b("x"), "STEPS": i32(9)}, model, capped)


def test_system_yaml_rejects_unknown_and_bad_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("device: cpu\ndevcie: cuda\n")
    with pytest.raises(ConfigError, match="unknown system params \\['devcie'\\]"):
        SystemParams.load(str(bad))
    bad.write_text("device: tpu\n")
    with pytest.raises(ConfigError, match="device='tpu'"):
        SystemParams.load(str(bad))


def test_model_yaml_missing_key_is_a_config_error(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("family: flux\nweights: x\n")
    with pytest.raises(ConfigError, match="bad or missing model param"):
        ModelParams.load(str(bad))


@pytest.mark.parametrize("name", ["tiny-flux", "flux1-dev", "flux1-schnell"])
def test_shipped_model_yamls_load(name):
    model = ModelParams.load(name)
    assert model.family == "flux" and model.task == "image"
    assert model.steps.min <= model.default_steps <= model.steps.max


@pytest.mark.parametrize("name", ["cpu", "cpu-1thread", "cpu-sp2", "cpu-ring2", "gpu-1", "gpu-2", "gpu-4", "gpu-4-hybrid", "gpu-2-cfg"])
def test_shipped_system_yamls_load(name):
    assert SystemParams.load(name).world_size >= 1


def test_cache_ratio_needs_a_tuned_cache_section(model, system):
    untuned = dataclasses.replace(model, cache={})
    parse_user_params({"PROMPT": b("x"), "CACHE_RATIO": f32(0.0)}, untuned, system)
    with pytest.raises(ParamError, match=r"CACHE_RATIO: 0.5 is out of range; allowed \[0, 0\]"):
        parse_user_params({"PROMPT": b("x"), "CACHE_RATIO": f32(0.5)}, untuned, system)
