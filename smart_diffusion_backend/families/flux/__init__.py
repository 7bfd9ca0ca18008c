"""The Flux family: FluxPipeline-compatible directories (Flux.1-dev, Flux.1-schnell, tiny-flux).

    spec.py       FAMILY: what the library knows about the family (torch-free)
    stages.py     FluxTextEncoder, FluxDenoiser, FluxDecoder
    attention.py  FluxPluggableAttnProcessor
"""

from .spec import FAMILY

__all__ = ["FAMILY"]
