"""Run the facade as a subprocess beside tritonserver (`make serve`, tests): start, wait ready, stop.

The child gets SIGTERM from the kernel when the thread that started it exits (PR_SET_PDEATHSIG), so a
launcher killed outright leaves no facade behind; stop() is SIGTERM (aiohttp finishes requests in
flight for shutdown_timeout_s), then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from smart_diffusion_backend.serving import parent_death_signal

from .app import FacadeConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class FacadeError(RuntimeError):
    pass


def command(config: FacadeConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "smart_diffusion_openai",
        "--triton-grpc",
        config.triton_grpc,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-n",
        str(config.max_n),
        "--timeout-s",
        f"{config.timeout_s:g}",
        "--shutdown-timeout-s",
        f"{config.shutdown_timeout_s:g}",
        "--max-upload-bytes",
        str(config.max_upload_bytes),
        "--max-input-pixels",
        str(config.max_input_pixels),
    ]


@dataclass
class FacadeProcess:
    """The facade in a subprocess. Use as a context manager, or start()/stop()."""

    config: FacadeConfig
    log_file: Path | None = None  # None: inherit our stdout/stderr
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL: `OpenAI(base_url=facade.url, api_key="unused")`."""
        return f"http://{self.config.host}:{self.config.port}/v1"

    def start(self, ready_timeout_s: float = 60.0, wait_for_triton: bool = True) -> "FacadeProcess":
        """Start and wait until /health answers 200 (tritonserver ready too) or, with
        `wait_for_triton=False`, until the facade itself listens (/health/live)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        log = open(self.log_file, "ab") if self.log_file else None
        try:
            self.process = subprocess.Popen(
                command(self.config),
                env=env,
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                preexec_fn=parent_death_signal(signal.SIGTERM),
            )
        finally:
            if log:
                log.close()  # the child holds its own descriptor
        try:
            self._wait_ready("/health" if wait_for_triton else "/health/live", ready_timeout_s)
        except BaseException:
            self.stop(grace_s=5)
            raise
        return self

    def _wait_ready(self, path: str, timeout_s: float) -> None:
        url = f"http://{self.config.host}:{self.config.port}{path}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise FacadeError(f"the OpenAI facade exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise FacadeError(
            f"the OpenAI facade was not ready at {url} after {timeout_s:.0f} s; stopped it:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return "(no log file)"
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s` (default: the shutdown timeout + 5 s); the exit code."""
        if self.process is None:
            return None
        proc, self.process = self.process, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.config.shutdown_timeout_s + 5 if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def __enter__(self) -> "FacadeProcess":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(config: FacadeConfig, log_file: Path | None = None, ready_timeout_s: float = 60.0) -> FacadeProcess:
    """Start the facade in a subprocess and wait until it and tritonserver are ready; call stop() (or use
    it as a context manager) to end it."""
    return FacadeProcess(config, log_file).start(ready_timeout_s)
