"""Hostile direct calls to the internal stage models of a real tritonserver.

Each call is answered with a clear error within 2 s, the server's processes grow by less than 200 MB
(PSS: a shared memory region counts once), and a normal request works right after. Without a grant every stage refuses at once (UNSUPPORTED, HTTP 501);
with a grant minted the way the server's own models mint them (the key is derived from the server's
pid, stage_guard.server_key), the stage's own validation answers INVALID_ARG naming the field.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from smart_diffusion_backend.serving import pss_bytes
from smart_diffusion_backend.stage_guard import GRANT_KEY, binding, mint, server_key
from smart_diffusion_client import SmartDiffusionClient

pytestmark = pytest.mark.server

MAX_SECONDS, MAX_GROWTH = 2.0, 200 * 2**20
PIPELINE = "tiny-flux"  # ModelParams.name of the served model: grants bind it
CONDITIONING = (("IMAGE_LATENTS", 4), ("MASK_LATENTS", 4), ("IMAGE_EMBEDS", 3))


def _tensor(name: str, array: np.ndarray):
    import tritonclient.http as httpclient

    dtype = "BYTES" if array.dtype == np.object_ else {np.float32: "FP32", np.float16: "FP16"}[array.dtype.type]
    tensor = httpclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _stats(grant: dict | None) -> np.ndarray:
    return np.array([json.dumps({GRANT_KEY: grant} if grant else {}).encode()], dtype=np.object_)


def _granted(key: bytes, stage: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**tensors, "STATS": _stats(mint(key, PIPELINE, stage, binding(stage, tensors)))}


def _latents(h: int, w: int, value: float = 0.0) -> np.ndarray:
    return np.full((1, 16, h, w), value, np.float32)


def _embeds(seq: int = 32, width: int = 32, value: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "PROMPT_EMBEDS": np.full((1, seq, width), value, np.float32),
        "POOLED_PROMPT_EMBEDS": np.zeros((1, 32), np.float32),
        # tiny-flux takes image conditioning: the encoder's three tensors, zero-size without an image
        **{name: np.zeros((0,) * rank, np.float32) for name, rank in CONDITIONING},
    }


def _prompt(text: bytes) -> dict[str, np.ndarray]:
    return {"PROMPT": np.array([text], dtype=np.object_)}


def hostile_calls(key: bytes) -> list[tuple[str, str, dict[str, np.ndarray], str, str]]:
    """(case, model, inputs, expected HTTP status, expected text in the error)."""
    forged = {"stage": "vae_decoder", "mac": "0" * 64}
    small_grant = mint(key, PIPELINE, "vae_decoder", binding("vae_decoder", {"LATENTS": _latents(8, 8)}))
    return [
        # No grant: refused before any tensor is read, whatever the tensor (UNSUPPORTED: HTTP 501).
        ("big latents, no grant", "vae_decoder", {"LATENTS": _latents(1024, 1024)}, "501", "vae_decoder is an internal stage"),
        ("latents, forged grant", "vae_decoder", {"LATENTS": _latents(8, 8), "STATS": _stats(forged)}, "501", "grant does not match"),
        ("grant replayed on other shape", "vae_decoder", {"LATENTS": _latents(16, 16), "STATS": _stats(small_grant)}, "501", "grant does not match"),
        ("embeds, no grant", "denoiser", _embeds(), "501", "denoiser is an internal stage"),
        ("prompt, no grant", "text_encoder", _prompt(b"a cat"), "501", "text_encoder is an internal stage"),
        ("STATS of 1 MB", "vae_decoder", {"LATENTS": _latents(8, 8), "STATS": np.array([b"x" * 2**20], dtype=np.object_)}, "501", "STATS: 1048576 bytes; allowed at most 65536"),
        # Shapes that contradict config.pbtxt: Triton refuses them before the model's process sees them.
        ("100000 text tokens", "denoiser", _embeds(seq=100_000), "400", "unexpected shape for input 'PROMPT_EMBEDS'"),
        ("wrong rank", "vae_decoder", {"LATENTS": np.zeros((16, 8, 8), np.float32)}, "400", "unexpected shape for input 'LATENTS'"),
        ("wrong channels", "vae_decoder", {"LATENTS": np.zeros((1, 3, 8, 8), np.float32)}, "400", "unexpected shape for input 'LATENTS'"),
        ("wrong dtype", "vae_decoder", {"LATENTS": np.zeros((1, 16, 8, 8), np.float16)}, "400", "data-type is 'FP16', but model 'vae_decoder' expects 'FP32'"),
        # With a valid grant, the stage's own checks against the model's limits answer, naming the field.
        ("latents past the size limit", "vae_decoder", _granted(key, "vae_decoder", {"LATENTS": _latents(256, 256)}), "400", "LATENTS: shape [1, 16, 256, 256]: h=256 decodes to 2048 pixels"),
        ("empty latents", "vae_decoder", _granted(key, "vae_decoder", {"LATENTS": _latents(0, 0)}), "400", "LATENTS: shape [1, 16, 0, 0]: h=0"),
        ("NaN latents", "vae_decoder", _granted(key, "vae_decoder", {"LATENTS": _latents(8, 8, np.nan)}), "400", "LATENTS: contains non-finite values"),
        ("Inf embeddings", "denoiser", _granted(key, "denoiser", _embeds(value=np.inf)), "400", "PROMPT_EMBEDS: contains non-finite values"),
        ("over-long prompt", "text_encoder", _granted(key, "text_encoder", _prompt(b"x" * 100_000)), "400", "PROMPT: has 100000 bytes; allowed at most 8000"),
        ("prompt not UTF-8", "text_encoder", _granted(key, "text_encoder", _prompt(b"\xff\xfe")), "400", "PROMPT: is not valid UTF-8"),
    ]


def _tree_memory(server) -> int:
    """The server tree's memory, shared regions counted once (PSS)."""
    return sum(pss_bytes(server.process_tree()).values())


def test_hostile_direct_calls_are_refused_fast_and_serving_goes_on(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    key = server_key(server.process.pid)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=60)
    failures = []
    try:
        for case, model, inputs, status, text in hostile_calls(key):
            before = _tree_memory(server)
            started = time.perf_counter()
            try:
                client.infer(model, [_tensor(name, array) for name, array in inputs.items()])
                failures.append(f"{case}: answered OK")
                continue
            except InferenceServerException as exc:
                seconds, error = time.perf_counter() - started, exc
            growth = _tree_memory(server) - before
            if error.status() != status or text not in error.message():
                failures.append(f"{case}: [{error.status()}] {error.message()!r}, expected [{status}] ...{text!r}...")
            if seconds > MAX_SECONDS:
                failures.append(f"{case}: answered after {seconds:.2f} s")
            if growth > MAX_GROWTH:
                failures.append(f"{case}: the server's processes grew by {growth / 2**20:.0f} MB")
            with SmartDiffusionClient(server.http_url, "http") as normal:
                if normal.generate("a cat", seed=3, steps=2).image.shape != (64, 64, 3):
                    failures.append(f"{case}: the next normal request failed")
    finally:
        client.close()
    assert not failures, "\n".join(failures)


def test_a_valid_grant_runs_the_stage_and_hands_on_the_next_one(server):
    """The granted path is the one the entry models use: text_encoder's STATS carries the denoiser's grant."""
    import tritonclient.http as httpclient

    key = server_key(server.process.pid)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inputs = _granted(key, "text_encoder", _prompt(b"a cat"))
        result = client.infer("text_encoder", [_tensor(n, a) for n, a in inputs.items()])
        stats = json.loads(result.as_numpy("STATS")[0])
        names = ("PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", *(name for name, _ in CONDITIONING))
        embeds = {n: result.as_numpy(n) for n in names}
        assert stats[GRANT_KEY] == mint(key, PIPELINE, "denoiser", binding("denoiser", embeds))
    finally:
        client.close()


def test_another_servers_key_grants_nothing(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        inputs = _granted(server_key(server.process.pid + 1), "vae_decoder", {"LATENTS": _latents(8, 8)})
        with pytest.raises(InferenceServerException, match="grant does not match"):
            client.infer("vae_decoder", [_tensor(n, a) for n, a in inputs.items()])
    finally:
        client.close()
