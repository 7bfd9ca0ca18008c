"""`client`: the short name of `smart_diffusion_client`, kept for `python -m client ...` in a checkout.

The package is `smart_diffusion_client` (installed under that name, so it cannot shadow another `client`
module); this alias re-exports its API and runs its command line.
"""

from smart_diffusion_client import GenerationError, GenerationResult, Request, SmartDiffusionClient

__all__ = ["GenerationError", "GenerationResult", "Request", "SmartDiffusionClient"]
