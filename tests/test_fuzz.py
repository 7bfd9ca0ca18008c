"""Fuzz the request surface (hypothesis): any dtype, shape and value either works or is INVALID_ARG.

Two layers: the parser alone (many examples, no server) and the real `smart_diffusion` model over
HTTP (a short budget, on the session's server). Never an internal error, never a dead server.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smart_diffusion_backend.errors import ParamError
from smart_diffusion_backend.params import UserParams, parse_user_params
from smart_diffusion_backend.wire import FIELDS, request_field_names

NAMES = request_field_names("image")
TRITON_DTYPES = {
    "BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP64": np.float64,
    "FP16": np.float16, "UINT8": np.uint8, "INT8": np.int8, "BOOL": np.bool_,
}
# Sizes and steps stay cheap when they happen to be valid; the rest probe every edge.
INTS = st.sampled_from([0, 1, 2, 3, 16, 17, 32, 48, 64, -1, -16, 50, 51, 1024, 2048, 2**31 - 1, -(2**31)])
FLOATS = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.5, -3.0, 1e30, float("nan"), float("inf"), -float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
TEXT = st.one_of(
    st.text(max_size=40), st.binary(max_size=40), st.sampled_from(["", " ", "a cat", "x" * 3000, "ünï ✓"])
)
SHAPES = st.sampled_from([[1], [1], [2], [1, 1], [0]])
# Valid and cheap values, drawn half the time for a well-typed input, so real generations happen too.
GOOD = {
    "PROMPT": [b"a cat"], "NEGATIVE_PROMPT": [b""], "HEIGHT": [32, 64], "WIDTH": [32, 64], "STEPS": [1, 2],
    "GUIDANCE_SCALE": [0.0, 3.5], "CACHE_RATIO": [0.0, 0.5], "SEED": [0, 7],
}


def _values(dtype: str, shape: list[int]) -> st.SearchStrategy:
    size = int(np.prod(shape))
    if dtype == "BYTES":
        element = TEXT.map(lambda v: v if isinstance(v, bytes) else v.encode("utf-8"))
    elif dtype in ("FP32", "FP64", "FP16"):
        element = FLOATS
    elif dtype == "BOOL":
        element = st.booleans()
    else:
        element = INTS
    return st.lists(element, min_size=size, max_size=size)


def _array(dtype: str, shape: list[int], values: list) -> np.ndarray:
    np_dtype = TRITON_DTYPES[dtype]
    if np_dtype is np.object_:
        return np.array(values, dtype=np.object_).reshape(shape)
    with np.errstate(all="ignore"):  # out-of-range ints wrap, big floats overflow: still a valid tensor
        return np.array(values, dtype=np.float64 if np_dtype in (np.float16, np.float32) else None).astype(np_dtype).reshape(shape)


@st.composite
def request_tensors(draw) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (Triton dtype, array): a random subset of the inputs, well-formed but for (usually) one
    input whose dtype, shape or value is drawn from everything — so the server's own checks, ours,
    and real generations are all reached."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    if "PROMPT" not in names and draw(st.integers(0, 9)) < 8:
        names.append("PROMPT")
    if draw(st.integers(0, 19)) == 0:
        names.append("COLOR")
    mutated = draw(st.sampled_from(names)) if names and draw(st.integers(0, 9)) < 8 else None
    tensors = {}
    for name in names:
        kind = FIELDS[name].kind if name in FIELDS else "int"
        usual = {"bytes": "BYTES", "int": "INT64" if name == "SEED" else "INT32", "float": "FP32"}[kind]
        dtype, shape = usual, [1]
        if name == mutated:
            dtype = draw(st.one_of(st.just(usual), st.sampled_from(sorted(TRITON_DTYPES))))
            shape = draw(SHAPES)
        if name in GOOD and name != mutated and draw(st.integers(0, 9)) < 8:
            values = [draw(st.sampled_from(GOOD[name]))]
        else:
            values = draw(_values(dtype, shape))
        tensors[name] = (dtype, _array(dtype, shape, values))
    return tensors


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_tensors())
def test_parser_answers_params_or_a_param_error(tiny_flux, cpu_system, tensors):
    try:
        params = parse_user_params({n: a for n, (_, a) in tensors.items()}, tiny_flux, cpu_system)
    except ParamError as exc:
        assert str(exc).split(":")[0] in (*NAMES, "COLOR", "HEIGHT*WIDTH"), str(exc)
        return
    assert isinstance(params, UserParams)
    assert params.height * params.width <= cpu_system.max_pixels_per_request


@pytest.mark.server
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tensors=request_tensors())
def test_server_answers_an_image_or_invalid_arg(server, tensors):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, (dtype, array) in tensors.items():
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
    try:
        result = client.infer("smart_diffusion", inputs)
        image = result.as_numpy("IMAGE")
        assert image.dtype == np.uint8 and image.shape[0] == 1 and image.ndim == 4 and image.shape[3] == 3
        event("image")
    except InferenceServerException as exc:
        event(f"INVALID_ARG {exc.message()[:90]}")
        assert exc.status() == "400", (exc.status(), exc.message())
        assert "internal error" not in exc.message(), exc.message()
    finally:
        client.close()
