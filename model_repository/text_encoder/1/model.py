"""text_encoder: prompt (and negative prompt) -> text embeddings. Thin adapter over TextEncoderService."""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.service import TextEncoderService, load_params


class TritonPythonModel:
    def initialize(self, args):
        config, params = adapter.model_parameters(args)
        self.name = config["name"]
        model_config = adapter.required_parameter(pb_utils, params, "model_config", self.name)
        system_config = adapter.required_parameter(pb_utils, params, "system_config", self.name)
        self.service = adapter.load_or_fail(
            pb_utils, self.name, lambda: TextEncoderService(*load_params(model_config, system_config))
        )
        self.inputs = adapter.input_names(config)

    def execute(self, requests):
        return adapter.execute_each(
            pb_utils, requests, self.name, lambda r: self.service(adapter.read_inputs(pb_utils, r, self.inputs))
        )
