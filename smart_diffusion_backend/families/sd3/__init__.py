"""The SD3 family: StableDiffusion3Pipeline-compatible directories (SD3-medium, SD3.5 medium / large, tiny-sd3).

    spec.py       FAMILY: what the library knows about the family (torch-free)
    stages.py     SD3TextEncoder, SD3Denoiser, SD3Decoder
    attention.py  SD3PluggableAttnProcessor
"""

from .spec import FAMILY

__all__ = ["FAMILY"]
