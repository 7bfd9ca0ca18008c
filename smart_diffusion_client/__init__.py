"""Smart-Diffusion client: `python -m smart_diffusion_client generate --prompt ...` or the API below."""

from .api import GenerationError, GenerationResult, Request, SmartDiffusionClient

__all__ = ["GenerationError", "GenerationResult", "Request", "SmartDiffusionClient"]
