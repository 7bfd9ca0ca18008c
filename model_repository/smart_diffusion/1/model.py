"""smart_diffusion: the BLS orchestrator (plain request/response).

Validates every user param up front (INVALID_ARG naming the field), then calls
text_encoder -> denoiser -> vae_decoder and returns the image with the merged STATS.
Requests wait in the admission's bounded queue for one of its pipeline slots; one that cannot
finish within its `timeout` or the server's max_queue_delay_s is refused at once (UNAVAILABLE).
A request the client cancels (gRPC cancel or deadline) or that runs past its own `timeout`
parameter stops within one denoising step.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import orchestrator
from smart_diffusion_backend.metrics import ServingMetrics


class TritonPythonModel:
    def initialize(self, args):
        self.setup, self.pipeline = orchestrator.load_orchestrator(pb_utils, args)
        self.metrics = ServingMetrics(pb_utils, args, self.setup.name)
        self.admission = orchestrator.entry_admission(self.setup, self.pipeline, self.metrics)

    def execute(self, requests):
        for request in requests:
            orchestrator.serve_admitted(
                pb_utils, request, self.setup, self.pipeline, self.admission, self._generate, self.metrics
            )
        return None  # answered through each request's response sender

    def _generate(self, params, sender, job):
        return self.pipeline.run(
            params, cancel_check=job.cancelled, timeout_s=job.timeout_s, arrived=job.arrived
        )

    def finalize(self):
        self.admission.close()
        self.metrics.close()
