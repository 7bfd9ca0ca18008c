"""denoiser: text embeddings + user params -> latents. Thin adapter over DenoiserService.

PROGRESS_CHANNEL (optional, set by the streaming orchestrator) names a step channel: one progress
message per step goes there, and a cancel message coming back stops the loop within one step.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.progress import StepReporter
from smart_diffusion_backend.service import DenoiserService, load_params


class TritonPythonModel:
    def initialize(self, args):
        config, params = adapter.model_parameters(args)
        self.name = config["name"]
        model_config = adapter.required_parameter(pb_utils, params, "model_config", self.name)
        system_config = adapter.required_parameter(pb_utils, params, "system_config", self.name)
        self.service = adapter.load_or_fail(
            pb_utils, self.name, lambda: DenoiserService(*load_params(model_config, system_config))
        )
        self.inputs = [n for n in adapter.input_names(config) if n != "PROGRESS_CHANNEL"]

    def _denoise(self, request):
        inputs = adapter.read_inputs(pb_utils, request, self.inputs)
        channel = pb_utils.get_input_tensor_by_name(request, "PROGRESS_CHANNEL")
        if channel is None:
            return self.service(inputs)
        reporter = StepReporter(channel.as_numpy().reshape(-1)[0].decode())
        try:
            return self.service(inputs, on_step=reporter)
        finally:
            reporter.close()

    def execute(self, requests):
        return adapter.execute_each(pb_utils, requests, self.name, self._denoise)
