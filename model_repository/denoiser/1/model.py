"""denoiser: text embeddings + user params -> latents. Thin adapter over DenoiserService.

PROGRESS_CHANNEL (optional, set by the orchestrators) names a step channel: one progress message
per step goes there, and a cancel message coming back stops the loop within one step.
With more than one rank in the system params the loop runs in a worker pool owned by this model
(spawned in initialize, stopped in finalize). Steps, cache skips and pool restarts go to metrics.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.metrics import ServingMetrics
from smart_diffusion_backend.service import DenoiserService
from smart_diffusion_backend.wire import read_stats


class TritonPythonModel:
    def initialize(self, args):
        self.setup = adapter.setup(pb_utils, args)
        self.service = adapter.load_service(pb_utils, self.setup, DenoiserService)
        self.guard = adapter.StageGuard("denoiser", self.service.model.name)
        self.inputs = [n for n in self.setup.inputs if n != "PROGRESS_CHANNEL"]
        self.metrics = ServingMetrics(pb_utils, args, self.setup.name)

    def _denoise(self, request):
        inputs = adapter.read_inputs(pb_utils, request, self.inputs)

        def denoise(admitted):
            channel = adapter.progress_channel(pb_utils, request)
            return self.service(admitted, progress_channel=channel, cancel_check=request.is_cancelled)

        with self.metrics.in_flight():
            outputs = self.guard(inputs, denoise)
        self.metrics.observe_denoise(read_stats(outputs))
        return outputs

    def execute(self, requests):
        responses = adapter.execute_each(pb_utils, requests, self.setup.name, self._denoise, self.metrics, "denoiser")
        self.metrics.set_pool_restarts(adapter.pool_restarts(self.service))
        return responses

    def finalize(self):
        self.metrics.close()
        self.service.close()  # stops the worker pool, if any
