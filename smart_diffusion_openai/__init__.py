"""An OpenAI-compatible images API (aiohttp) in front of tritonserver, over gRPC (docs/openai.md).

    python -m smart_diffusion_openai --triton-grpc 127.0.0.1:8001 --port 8080
    OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused").images.generate(prompt="a red circle")

tritonclient only: nothing here imports Triton's server side or torch.
"""

from .app import FacadeConfig, create_app, run
from .launcher import FacadeError, FacadeProcess, launch

__all__ = ["FacadeConfig", "FacadeError", "FacadeProcess", "create_app", "launch", "run"]
