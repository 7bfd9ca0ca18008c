"""The Wan family: WanPipeline-compatible directories (Wan2.1-T2V-1.3B / 14B, Wan2.2 T2V, tiny-wan).

    spec.py       FAMILY: what the library knows about the family (torch-free)
    stages.py     WanTextEncoder, WanDenoiser, WanDecoder
    attention.py  WanPluggableAttnProcessor
"""

from .spec import FAMILY

__all__ = ["FAMILY"]
