"""request_gate: the ensemble's first step. Validates every user param up front (INVALID_ARG naming the
field) and hands the text encoder the grant that lets the request through the internal stages."""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.orchestrator import RequestGate


class TritonPythonModel:
    def initialize(self, args):
        self.setup = adapter.setup(pb_utils, args)
        self.gate = adapter.load_or_fail(
            pb_utils, self.setup.name, lambda: RequestGate.load(self.setup.model_config, self.setup.system_config)
        )

    def execute(self, requests):
        return adapter.execute_each(
            pb_utils, requests, self.setup.name, lambda r: self.gate(adapter.read_inputs(pb_utils, r, self.setup.inputs))
        )
