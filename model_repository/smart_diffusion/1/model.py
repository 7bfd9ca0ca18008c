"""smart_diffusion: the BLS orchestrator (plain request/response).

Validates every user param up front (INVALID_ARG naming the field), then calls
text_encoder -> denoiser -> vae_decoder and returns the image with the merged STATS.
A request the client cancels (gRPC cancel or deadline) or that runs past its own `timeout`
parameter stops within one denoising step.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.metrics import ServingMetrics


class TritonPythonModel:
    def initialize(self, args):
        self.setup, self.pipeline = adapter.load_orchestrator(pb_utils, args)
        self.metrics = ServingMetrics(pb_utils, args, self.setup.name)

    def _generate(self, request):
        params = self.pipeline.parse(adapter.read_inputs(pb_utils, request, self.setup.inputs))
        with self.metrics.in_flight():
            return self.pipeline.run(
                params, cancel_check=request.is_cancelled, timeout_s=adapter.request_timeout_s(request)
            )

    def execute(self, requests):
        return adapter.execute_each(pb_utils, requests, self.setup.name, self._generate, self.metrics, "pipeline")

    def finalize(self):
        self.metrics.close()
