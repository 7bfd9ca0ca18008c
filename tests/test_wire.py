"""The wire schema (smart_diffusion_backend/wire.py) is the one declaration: the committed repository's
configs, the client, UserParams and the parser all agree with it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from smart_diffusion_backend.params import ModelParams, SystemParams, UserParams, parse_user_params
from smart_diffusion_backend.repository import PipelineEntry, model_configs
from smart_diffusion_backend.wire import (
    FIELDS,
    REQUEST_FIELDS,
    TENSOR_DTYPES,
    denoiser_input_names,
    encode_request,
    request_field_names,
)
from smart_diffusion_client import Request

ROOT = Path(__file__).resolve().parent.parent
DECLARED = re.compile(r'name: "(\w+)" data_type: (\w+)')


def declared_dtypes(config_text: str) -> dict[str, str]:
    return dict(DECLARED.findall(config_text))


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-wan"])
def test_every_config_declares_the_schema_dtypes(model):
    for name, text in model_configs(PipelineEntry(model, ""), "cpu").items():
        for tensor, dtype in declared_dtypes(text).items():
            expected = (FIELDS[tensor].dtype if tensor in FIELDS else TENSOR_DTYPES[tensor]).config
            assert dtype == expected, f"{model}/{name}: {tensor} declared {dtype}, schema says {expected}"


def test_committed_repository_accepts_exactly_the_image_fields():
    from smart_diffusion_backend.repository import DEFAULT_MODEL

    accepts = ModelParams.load(DEFAULT_MODEL).accepts
    for entry in ("smart_diffusion", "smart_diffusion_stream", "smart_diffusion_ensemble", "request_gate"):
        text = (ROOT / "model_repository" / entry / "config.pbtxt").read_text()
        inputs = text[text.index("input [") : text.index("output [")]
        assert list(declared_dtypes(inputs)) == request_field_names("image", accepts), entry
    denoiser = (ROOT / "model_repository" / "denoiser" / "config.pbtxt").read_text()
    assert set(denoiser_input_names("image", accepts)) <= set(declared_dtypes(denoiser))


def test_client_request_and_user_params_carry_the_schema_fields():
    attrs = [f.attr for f in REQUEST_FIELDS]
    assert [f.name for f in dataclasses.fields(Request)] == attrs
    assert sorted(f.name for f in dataclasses.fields(UserParams)) == sorted(attrs)
    request = Request("a cat", negative_prompt="", height=64, width=96, num_frames=9, steps=3,
                      guidance_scale=2.5, cache_ratio=0.5, seed=2**40, input_image=np.zeros((8, 12, 3), np.uint8),
                      mask_image=np.zeros((8, 12), np.uint8), strength=0.5, lora=("a", "b"), lora_scale=(1.0, 0.5),
                      num_images=2)
    tensors = request.tensors()
    assert list(tensors) == [f.name for f in REQUEST_FIELDS]
    for name, (array, triton_dtype) in tensors.items():
        field = FIELDS[name]
        assert array.dtype == field.dtype.numpy and triton_dtype == field.dtype.triton, name
        assert array.ndim == len(field.shape) and all(e in (-1, s) for s, e in zip(array.shape, field.shape)), name


def test_encoded_user_params_parse_back_to_themselves():
    model, system = ModelParams.load("tiny-wan"), SystemParams.load("cpu")
    params = UserParams("a cat", "blurry", 64, 96, 3, 2.5, 0.0, 2**40, num_frames=9)
    names = request_field_names(model.task, model.accepts)
    assert parse_user_params(encode_request(vars(params), names), model, system) == params
    assert encode_request({"prompt": "a", "seed": None, "lora": ()}) == {"PROMPT": np.array([b"a"], dtype=np.object_)}
