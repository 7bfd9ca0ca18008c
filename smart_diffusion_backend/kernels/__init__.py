"""Triton kernels: attention forward (bf16/fp16 and quantised), and the rowwise e4m3 quantisation of
fp8_linear's GEMM inputs (``rowwise_fp8``).

Modules, imports running one way (docs/attention.md):
* ``common``: shared helpers (interpreter detection, per-mode jit, head-dim padding, Q/K quantisation); a leaf.
* ``flash_attention``: the portable Triton-lang attention kernel; imports ``common`` only.
* ``hopper_attention``: the Hopper (sm_90) Gluon attention kernel; imports ``common`` only.
* ``rowwise_fp8``: the rowwise e4m3 quantisation kernel; imports ``common`` only.
* ``attention``: the dispatcher, ``flash_attention(...)``, which picks the Hopper or the portable kernel.

The package re-exports the dispatcher's public names, so ``smart_diffusion_backend.kernels.flash_attention`` is
the function here; import the portable kernel's module with ``importlib.import_module`` when it is the module
you need.
"""

from smart_diffusion_backend.kernels.attention import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    flash_attention,
    flash_attention_fp8,
)

__all__ = ["flash_attention", "flash_attention_fp8", "MAX_HEAD_DIM", "SUPPORTED_DTYPES"]
