"""smart_diffusion: the BLS orchestrator (plain request/response).

Validates every user param up front (INVALID_ARG naming the field), then calls
text_encoder -> denoiser -> vae_decoder and returns the image with the merged STATS.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.params import ModelParams, SystemParams


class TritonPythonModel:
    def initialize(self, args):
        self.setup = adapter.setup(pb_utils, args, adapter.STAGE_MODEL_KEYS)
        self.pipeline = adapter.load_or_fail(
            pb_utils,
            self.setup.name,
            lambda: adapter.PipelineOrchestrator(
                pb_utils,
                ModelParams.load(self.setup.model_config),
                SystemParams.load(self.setup.system_config),
                self.setup.extra,
            ),
        )

    def execute(self, requests):
        return adapter.execute_each(
            pb_utils,
            requests,
            self.setup.name,
            lambda r: self.pipeline.run(self.pipeline.parse(adapter.read_inputs(pb_utils, r, self.setup.inputs))),
        )
