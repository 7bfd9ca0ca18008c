"""vae_decoder: latents -> uint8 image (or video). Thin adapter over DecoderService."""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.metrics import ServingMetrics
from smart_diffusion_backend.service import DecoderService


class TritonPythonModel:
    def initialize(self, args):
        self.setup = adapter.setup(pb_utils, args)
        self.metrics = ServingMetrics(pb_utils, args, self.setup.name)
        self.service = adapter.load_service(pb_utils, self.setup, DecoderService)
        self.guard = adapter.StageGuard("vae_decoder", self.service.model.name)

    def execute(self, requests):
        return adapter.execute_each(
            pb_utils,
            requests,
            self.setup.name,
            lambda r: self.guard(adapter.read_inputs(pb_utils, r, self.setup.inputs), self.service),
            self.metrics,
            "vae_decoder",
        )

    def finalize(self):
        self.metrics.close()
        self.service.close()  # stops the parallel-decode pool, if any
