"""Who may call the internal stage models: grants carried in STATS.

Triton serves every model of a repository to every client, so the stage models (text_encoder,
denoiser, vae_decoder) can be called directly, past the entry models' validation and admission.
Each stage therefore takes a request only when its STATS input carries a *grant*: an HMAC, under a
key that only this server's processes know, over the pipeline's model name, the stage it is meant
for and what that stage is about to receive (the digests of the prompts for the text encoder, the
shapes of the embeddings or latents for the others).

    entry model (smart_diffusion, _stream, request_gate) --grant(text_encoder, prompt digests)-->
    text_encoder --grant(denoiser, embedding shapes)--> denoiser --grant(vae_decoder, latent shape)-->
    vae_decoder

A grant only vouches that an earlier stage of this server produced tensors of these shapes, so a
replayed grant buys nothing a normal request could not; the stages still check every tensor against
the model's limits. A request without a valid grant is refused before any tensor of it is read.

The key is derived from the kernel's boot id (random per boot, not visible over the network), the
tritonserver process id and that process's start time: every Python-backend stub is a child of
tritonserver, so all models of one server derive the same key with no file or message to share,
and no two servers share one. `SMART_DIFFUSION_SERVER_SECRET`, when set in the server's
environment, is mixed in (operators who do not trust local users set it). Torch-free: the
orchestrators use it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import GrantError

GRANT_KEY = "grant"  # the STATS field holding the grant
SECRET_ENV = "SMART_DIFFUSION_SERVER_SECRET"
# STATS is a small JSON document; anything larger is refused before it is parsed.
MAX_STATS_BYTES = 64 * 1024


def _process_start_ticks(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); names this process uniquely
    together with its pid, since pids are reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def server_key(server_pid: int | None = None) -> bytes:
    """This server's grant key. Stubs call it with no argument (their parent is tritonserver); a test
    that started the server passes the server's pid to mint grants of its own."""
    pid = os.getppid() if server_pid is None else server_pid
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = ""
    material = "\n".join([boot_id, str(pid), _process_start_ticks(pid), os.environ.get(SECRET_ENV, "")])
    return hashlib.sha256(material.encode()).digest()


def text_binding(texts: Mapping[str, Any]) -> dict[str, str]:
    """What a text-encoder grant binds: a digest of each text input's bytes (absent inputs: none)."""
    binding = {}
    for name in sorted(texts):
        raw = texts[name]
        data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
        binding[name] = hashlib.sha256(data).hexdigest()
    return binding


def shape_binding(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """What a denoiser or decoder grant binds: the shape of each tensor."""
    return {name: [int(d) for d in shapes[name]] for name in sorted(shapes)}


# What each stage's grant binds, and which stage a stage mints the next grant for.
TEXT_BOUND = ("PROMPT", "NEGATIVE_PROMPT", "INPUT_IMAGE", "MASK_IMAGE")  # bound by their bytes' digest
SHAPE_BOUND = {
    "denoiser": ("PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "IMAGE_LATENTS", "MASK_LATENTS", "IMAGE_EMBEDS"),
    "vae_decoder": ("LATENTS",),
}
NEXT_STAGE = {"text_encoder": "denoiser", "denoiser": "vae_decoder"}


def _text_item(value: Any) -> bytes:
    """The bytes a text or image input's digest covers: a text's one element, an image's pixels and shape."""
    if hasattr(value, "dtype") and value.dtype != object:
        return repr(tuple(value.shape)).encode() + value.tobytes()
    item = value.reshape(-1)[0] if hasattr(value, "reshape") else value
    return item if isinstance(item, bytes) else str(item).encode("utf-8")


def binding(stage: str, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """What a grant for `stage` binds, computed from the tensors that stage receives (or its caller
    sends): the text inputs' digests for the text encoder, the bound tensors' shapes for the others."""
    if stage == "text_encoder":
        return text_binding({name: _text_item(tensors[name]) for name in TEXT_BOUND if name in tensors})
    if stage not in SHAPE_BOUND:
        raise ValueError(f"no grant binding for stage {stage!r}")
    return shape_binding({name: tuple(tensors[name].shape) for name in SHAPE_BOUND[stage] if name in tensors})


def _mac(key: bytes, model: str, stage: str, binding: Mapping[str, Any]) -> str:
    message = json.dumps({"model": model, "stage": stage, "bind": binding}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def mint(key: bytes, model: str, stage: str, binding: Mapping[str, Any]) -> dict[str, str]:
    """A grant for `stage` of pipeline `model` to receive what `binding` describes."""
    return {"stage": stage, "mac": _mac(key, model, stage, binding)}


def verify(key: bytes, model: str, stage: str, binding: Mapping[str, Any], grant: Any) -> None:
    """Raise GrantError unless `grant` was minted for exactly this stage and this binding."""
    if not isinstance(grant, dict) or not isinstance(grant.get("mac"), str):
        raise GrantError(_refusal(stage, "it carries no grant"))
    if not hmac.compare_digest(grant["mac"], _mac(key, model, stage, binding)):
        raise GrantError(_refusal(stage, "its grant does not match its inputs or this server"))


def _refusal(stage: str, why: str) -> str:
    return (
        f"{stage} is an internal stage: it takes requests only from this server's entry models "
        f"(smart_diffusion, smart_diffusion_stream, smart_diffusion_ensemble), and {why}; send the request there"
    )


def stats_bytes(raw: Any) -> bytes | None:
    """The one element of a STATS tensor as bytes, refused when it is too large to be ours."""
    if raw is None:
        return None
    items = list(raw.reshape(-1)) if hasattr(raw, "reshape") else [raw]
    if len(items) != 1:
        raise GrantError(f"STATS: expected exactly one element, got {len(items)}")
    item = items[0]
    data = item if isinstance(item, bytes) else str(item).encode("utf-8")
    if len(data) > MAX_STATS_BYTES:
        raise GrantError(f"STATS: {len(data)} bytes; allowed at most {MAX_STATS_BYTES}")
    return data


def take_grant(raw_stats: Any) -> tuple[dict[str, Any], Any]:
    """(STATS without its grant, the grant) from a STATS tensor; a malformed one carries no grant."""
    data = stats_bytes(raw_stats)
    if data is None:
        return {}, None
    try:
        stats = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}, None
    if not isinstance(stats, dict):
        return {}, None
    return stats, stats.pop(GRANT_KEY, None)
