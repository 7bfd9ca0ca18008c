"""smart_diffusion_stream: decoupled BLS orchestrator that streams progress.

One response (STEP, TOTAL_STEPS) after every denoising step, then the final response with the image,
STATS and the COMPLETE_FINAL flag. Usable with gRPC streaming and HTTP generate_stream.
A cancelled request stops its denoiser within one step; the stream still ends with the final flag.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.metrics import ServingMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _progress(step: int, total: int) -> dict:
    return {"STEP": np.array([step], np.int32), "TOTAL_STEPS": np.array([total], np.int32)}


class TritonPythonModel:
    def initialize(self, args):
        self.setup, self.pipeline = adapter.load_orchestrator(pb_utils, args)
        self.metrics = ServingMetrics(pb_utils, args, self.setup.name)

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        started = time.perf_counter()
        try:
            params = self.pipeline.parse(adapter.read_inputs(pb_utils, request, self.setup.inputs))
            with self.metrics.in_flight():
                outputs = self.pipeline.run(
                    params,
                    on_progress=lambda step, total: sender.send(adapter.response(pb_utils, _progress(step, total))),
                    cancel_check=request.is_cancelled,
                    timeout_s=adapter.request_timeout_s(request),
                )
            outputs.update(_progress(params.steps, params.steps))
            final = adapter.response(pb_utils, outputs)
        except Exception as exc:  # noqa: BLE001 - the stream always ends with the final flag
            final = adapter.error_response(pb_utils, exc, self.setup.name)
        self.metrics.observe_stage("pipeline", time.perf_counter() - started)
        self.metrics.count_responses([final])
        sender.send(final, flags=FINAL)

    def execute(self, requests):
        for request in requests:
            self._stream(request)
        return None

    def finalize(self):
        self.metrics.close()
