"""smart_diffusion_stream: decoupled BLS orchestrator that streams progress.

One response (STEP, TOTAL_STEPS) after every denoising step, then the final response with the image,
STATS and the COMPLETE_FINAL flag. Usable with gRPC streaming and HTTP generate_stream.
A cancelled request stops its denoiser within one step; the stream still ends with the final flag.
"""

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from smart_diffusion_backend import triton_adapter as adapter
from smart_diffusion_backend.params import ModelParams, SystemParams
from smart_diffusion_backend.progress import StepChannel

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _progress(step: int, total: int) -> dict:
    return {"STEP": np.array([step], np.int32), "TOTAL_STEPS": np.array([total], np.int32)}


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

    def _forward_progress(self, request, sender, channel: StepChannel, done: threading.Event) -> None:
        """Relay step messages as responses until the denoiser is done and the channel is drained."""
        cancel_sent = False
        while True:
            update = channel.receive(timeout_s=0.05)
            if update is not None:
                sender.send(adapter.response(pb_utils, _progress(*update)))
            elif done.is_set():
                return
            if not cancel_sent and request.is_cancelled():
                cancel_sent = channel.cancel()

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        try:
            params = self.pipeline.parse(adapter.read_inputs(pb_utils, request, self.setup.inputs))
            done = threading.Event()
            with StepChannel() as channel:
                relay = threading.Thread(
                    target=self._forward_progress, args=(request, sender, channel, done), daemon=True
                )
                relay.start()
                try:
                    outputs = self.pipeline.run(params, progress_channel=channel.address)
                finally:
                    done.set()
                    relay.join()
            outputs.update(_progress(params.steps, params.steps))
            sender.send(adapter.response(pb_utils, outputs), flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - the stream always ends with the final flag
            sender.send(adapter.error_response(pb_utils, exc, self.setup.name), flags=FINAL)

    def execute(self, requests):
        for request in requests:
            self._stream(request)
        return None
