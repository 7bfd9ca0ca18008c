"""smart_diffusion: the BLS orchestrator (plain request/response).

Validates every user param up front (INVALID_ARG naming the field), then calls
text_encoder -> denoiser -> vae_decoder and returns the image with the merged STATS.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.params import ModelParams, SystemParams


class TritonPythonModel:
    def initialize(self, args):
        config, params = adapter.model_parameters(args)
        self.name = config["name"]
        model_config = adapter.required_parameter(pb_utils, params, "model_config", self.name)
        system_config = adapter.required_parameter(pb_utils, params, "system_config", self.name)
        stages = {
            key: adapter.required_parameter(pb_utils, params, key, self.name)
            for key in ("text_encoder_model", "denoiser_model", "vae_decoder_model")
        }
        self.pipeline = adapter.load_or_fail(
            pb_utils,
            self.name,
            lambda: adapter.PipelineOrchestrator(
                pb_utils, ModelParams.load(model_config), SystemParams.load(system_config), stages
            ),
        )
        self.inputs = adapter.input_names(config)

    def execute(self, requests):
        return adapter.execute_each(
            pb_utils,
            requests,
            self.name,
            lambda r: self.pipeline.run(self.pipeline.parse(adapter.read_inputs(pb_utils, r, self.inputs))),
        )
