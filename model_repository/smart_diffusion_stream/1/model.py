"""smart_diffusion_stream: decoupled BLS orchestrator that streams progress.

One response (STEP, TOTAL_STEPS) after every denoising step, then the final response with the image,
STATS and the COMPLETE_FINAL flag. Usable with gRPC streaming and HTTP generate_stream.
Admission as in smart_diffusion; a cancelled request stops its denoiser within one step; the stream
always ends with the final flag.
"""

import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import orchestrator
from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.metrics import ServingMetrics
from smart_diffusion_backend.wire import progress_tensors


class TritonPythonModel:
    def initialize(self, args):
        self.setup, self.pipeline = orchestrator.load_orchestrator(pb_utils, args)
        self.metrics = ServingMetrics(pb_utils, args, self.setup.name)
        self.admission = orchestrator.entry_admission(self.setup, self.pipeline, self.metrics)

    def execute(self, requests):
        for request in requests:
            orchestrator.serve_admitted(
                pb_utils, request, self.setup, self.pipeline, self.admission, self._stream, self.metrics
            )
        return None

    def _stream(self, params, sender, job):
        outputs = self.pipeline.run(
            params,
            on_progress=lambda step, total: sender.send(adapter.response(pb_utils, progress_tensors(step, total))),
            cancel_check=job.cancelled,
            timeout_s=job.timeout_s,
            arrived=job.arrived,
        )
        outputs.update(progress_tensors(params.steps, params.steps))
        return outputs

    def finalize(self):
        self.admission.close()
        self.metrics.close()
