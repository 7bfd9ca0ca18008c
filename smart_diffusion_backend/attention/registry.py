"""Attention backends: one registry entry per implementation, each declaring its constraints.

Every backend's ``fn`` has the same contract (the one ``install_attention`` and the sequence-parallel code use)::

    fn(q, k, v, *, softmax_scale=None, kv_len=None, return_lse=False) -> out | (out, lse)
    q: [batch, heads, seq_q, head_dim]; k, v: [batch, heads, seq_kv, head_dim]   (torch SDPA layout)
    out: like q;  lse: float32 [batch, heads, seq_q], natural log
    kv_len: None, an int, or an int tensor [batch]: keys at positions >= kv_len are ignored.

Names (the system param ``attention_backend``): ``sdpa | triton | triton_int8 | flash_attn``. ``triton_fp8``, the
former name of ``triton_int8``, is accepted as an alias (``BACKEND_ALIASES``) and resolves to the same entry.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

__all__ = ["AttentionBackend", "AttentionFn", "BACKEND_ALIASES", "BACKEND_NAMES", "get_attention_backend",
           "list_attention_backends", "sdpa_attention", "triton_attention", "triton_int8_attention",
           "flash_attn_attention"]


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
                 kv_len: int | torch.Tensor | None = None,
                 return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------------------
# sdpa: torch's scaled_dot_product_attention, plus an LSE path for ring attention
# ----------------------------------------------------------------------------------------------------------
def _scale_or_default(q: torch.Tensor, softmax_scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def _empty_result(q: torch.Tensor, return_lse: bool):
    # kv_len == 0: no key is visible; output 0 and lse -inf (weight 0 in an LSE merge).
    out = torch.zeros_like(q)
    if not return_lse:
        return out
    return out, torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=torch.float32)


def _math_attention_lse(q, k, v, scale: float, kv_len) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 reference with a key mask; rows with no visible key give out 0 and lse -inf."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [b, h, sq, skv]
    if kv_len is not None:
        lengths = kv_len if isinstance(kv_len, torch.Tensor) else torch.full((q.shape[0],), int(kv_len),
                                                                             device=q.device)
        visible = torch.arange(k.shape[2], device=q.device)[None, :] < lengths.to(q.device)[:, None]  # [b, skv]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, h, sq]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # -inf - -inf on empty rows -> 0
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
                   kv_len: int | torch.Tensor | None = None, return_lse: bool = False):
    """torch SDPA. Without kv_len and lse it is exactly diffusers' default (native) attention call."""
    if isinstance(kv_len, int) and not isinstance(kv_len, bool):
        if kv_len <= 0:
            return _empty_result(q, return_lse)
        if kv_len < k.shape[2]:  # an int length is a plain slice: exact and keeps the fast kernels
            k, v = k[:, :, :kv_len], v[:, :, :kv_len]
        kv_len = None
    if not return_lse:
        if kv_len is None:
            return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
        visible = torch.arange(k.shape[2], device=q.device)[None, :] < kv_len[:, None]  # [b, skv]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=softmax_scale)
    scale = _scale_or_default(q, softmax_scale)
    if kv_len is None:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
            return out, lse
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse
    return _math_attention_lse(q, k, v, scale, kv_len)


# ----------------------------------------------------------------------------------------------------------
# triton: our kernels
# ----------------------------------------------------------------------------------------------------------
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
                     kv_len: int | torch.Tensor | None = None, return_lse: bool = False):
    from smart_diffusion_backend.kernels import flash_attention

    return flash_attention(q, k, v, softmax_scale=softmax_scale, kv_len=kv_len, return_lse=return_lse)


def triton_int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
                          kv_len: int | torch.Tensor | None = None, return_lse: bool = False):
    """Our kernel with int8 Q·Kᵀ and P·V in the inputs' dtype (SageAttention 1). Of the quantised modes it is the
    one that meets rel-L2 <= 2e-2 on random inputs (~1.3e-2); "fp8" (e4m3 Q/K and P·V) does not (~5e-2, e4m3
    has 3 mantissa bits): see docs/attention.md."""
    from smart_diffusion_backend.kernels import flash_attention

    return flash_attention(q, k, v, softmax_scale=softmax_scale, kv_len=kv_len, return_lse=return_lse,
                           precision="int8")


# ----------------------------------------------------------------------------------------------------------
# flash_attn: the flash-attn package ([b, s, h, d] layout)
# ----------------------------------------------------------------------------------------------------------
def flash_attn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None,
                         kv_len: int | torch.Tensor | None = None, return_lse: bool = False):
    from flash_attn import flash_attn_func

    def run(q_, k_, v_):
        # [b, h, s, d] -> [b, s, h, d] for flash-attn, and back
        out, lse, _ = flash_attn_func(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                      softmax_scale=softmax_scale, return_attn_probs=True)
        return out.transpose(1, 2), lse

    if isinstance(kv_len, torch.Tensor):  # one launch per batch element (DiT batches are 1-2)
        results = [flash_attn_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], softmax_scale=softmax_scale,
                                        kv_len=int(kv_len[i]), return_lse=True) for i in range(q.shape[0])]
        out = torch.cat([r[0] for r in results])
        lse = torch.cat([r[1] for r in results])
        return (out, lse) if return_lse else out
    if kv_len is not None:
        if kv_len <= 0:
            return _empty_result(q, return_lse)
        k, v = k[:, :, :kv_len], v[:, :, :kv_len]
    out, lse = run(q, k, v)
    return (out, lse.float()) if return_lse else out


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------
def _always() -> tuple[bool, str]:
    return True, "torch.nn.functional.scaled_dot_product_attention"


def _triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    from smart_diffusion_backend.kernels.common import interpreting  # the kernels' own reading of the flag

    if interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU in the interpreter)"
    return True, f"CUDA {torch.cuda.get_device_name()}"


def _triton_int8_available() -> tuple[bool, str]:
    ok, reason = _triton_available()
    if not ok or not torch.cuda.is_available():
        return ok, reason
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"needs a GPU with float8 (sm_89+), found sm_{major}{minor}"
    return True, reason


def _flash_attn_available() -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "the flash-attn package is not installed"
    if not torch.cuda.is_available():
        return False, "flash-attn needs a CUDA device"
    return True, "flash-attn package"


@dataclass(frozen=True)
class AttentionBackend:
    """One attention implementation and the inputs it accepts."""

    name: str
    fn: AttentionFn
    supports_lse: bool
    dtypes: tuple[torch.dtype, ...]
    min_head_dim: int
    max_head_dim: int
    devices: tuple[str, ...]
    description: str
    availability: Callable[[], tuple[bool, str]]

    def is_available(self) -> tuple[bool, str]:
        """(usable here, why or why not)."""
        return self.availability()

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False) -> None:
        """Raise ValueError when the inputs fall outside this backend's constraints."""
        if q.dtype not in self.dtypes:
            raise ValueError(f"attention backend {self.name!r} supports dtypes {self.dtypes}, got {q.dtype}")
        if not self.min_head_dim <= q.shape[-1] <= self.max_head_dim:
            raise ValueError(f"attention backend {self.name!r} supports head_dim in [{self.min_head_dim}, "
                             f"{self.max_head_dim}], got {q.shape[-1]}")
        if q.device.type not in self.devices:
            raise ValueError(f"attention backend {self.name!r} runs on {self.devices}, got {q.device}")
        if return_lse and not self.supports_lse:
            raise ValueError(f"attention backend {self.name!r} cannot return the log-sum-exp")


_BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend
    for backend in (
        AttentionBackend("sdpa", sdpa_attention, True, (torch.float16, torch.bfloat16, torch.float32), 1, 1024,
                         ("cpu", "cuda"), "torch SDPA (cuDNN/flash/mem-efficient on CUDA); LSE via flash ops "
                         "or an exact float32 fallback", _always),
        AttentionBackend("triton", triton_attention, True, (torch.float16, torch.bfloat16, torch.float32), 1, 256,
                         ("cuda", "cpu"), "our Triton flash-attention kernel (cpu only under TRITON_INTERPRET=1)",
                         _triton_available),
        AttentionBackend("triton_int8", triton_int8_attention, True, (torch.float16, torch.bfloat16), 1, 256,
                         ("cuda", "cpu"), "our Triton kernel with int8 Q·Kᵀ (precision='int8')",
                         _triton_int8_available),
        AttentionBackend("flash_attn", flash_attn_attention, True, (torch.float16, torch.bfloat16), 1, 256,
                         ("cuda",), "the flash-attn package (flash_attn_func)", _flash_attn_available),
    )
}
BACKEND_NAMES: tuple[str, ...] = tuple(_BACKENDS)
# Other names accepted for a backend: alias -> name in BACKEND_NAMES. "triton_fp8" is triton_int8's former name
# (the backend runs int8 Q·Kᵀ); system configs written with it keep working.
BACKEND_ALIASES: dict[str, str] = {"triton_fp8": "triton_int8"}


def get_attention_backend(name: str) -> AttentionBackend:
    """The registry entry for ``name`` (or an alias of it); ValueError listing the valid names otherwise."""
    try:
        return _BACKENDS[BACKEND_ALIASES.get(name, name)]
    except (KeyError, TypeError):
        aliases = ", ".join(f"{alias} -> {target}" for alias, target in BACKEND_ALIASES.items())
        raise ValueError(f"unknown attention backend {name!r}; valid names: {', '.join(BACKEND_NAMES)} "
                         f"(aliases: {aliases})") from None


def list_attention_backends() -> list[AttentionBackend]:
    return list(_BACKENDS.values())
