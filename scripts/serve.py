"""Run tritonserver in the foreground on one or more pipelines: `make serve MODEL=... SYSTEM=...`.

With the default model and system the committed model_repository/ is served as is; otherwise a
repository is generated into build/model_repository (model names prefixed per pipeline when
several are served).

SIGTERM, SIGINT (Ctrl-C) or SIGHUP, to this process, to make or to their process group, stop the
server in order: Triton drains and unloads, then the launcher exits with the server's exit status.
If the launcher is killed outright, the server gets SIGTERM from the kernel and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

from smart_diffusion_backend.params import project_root
from smart_diffusion_backend.repository import DEFAULT_MODEL, DEFAULT_SYSTEM, write_repository
from smart_diffusion_backend.serving import StopRequested, TritonServer, stop_on_signals
from smart_diffusion_openai import FacadeConfig, FacadeProcess


def repository_for(models: list[str], system: str) -> Path:
    if models == [DEFAULT_MODEL] and system == DEFAULT_SYSTEM:
        return project_root() / "model_repository"
    out = project_root() / "build" / "model_repository"
    shutil.rmtree(out, ignore_errors=True)
    write_repository(out, models, system)
    return out


def exit_status(returncode: int | None) -> int:
    """The shell's convention: a server killed by signal N gives 128 + N."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


def say(message: str) -> None:
    # After SIGHUP the terminal may be gone; the stop must go on regardless.
    with contextlib.suppress(OSError):
        print(message, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL", DEFAULT_MODEL), help="comma-separated model yamls")
    parser.add_argument("--system", default=os.environ.get("SYSTEM", DEFAULT_SYSTEM))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    parser.add_argument(
        "--openai-port", type=int, default=int(os.environ.get("OPENAI_PORT", 8080)),
        help="OpenAI-compatible images API beside the server (docs/openai.md); 0: none",
    )
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument(
        "--model-control-mode", choices=("none", "explicit"), default=os.environ.get("MODEL_CONTROL_MODE", "none"),
        help="explicit: every model loaded at start, and later loads/unloads through the repository API "
        "(hot upgrade: scripts/hot_upgrade.py, docs/operations.md)",
    )
    args = parser.parse_args()

    with stop_on_signals():
        repo = repository_for([m for m in args.model.split(",") if m], args.system)
        server = TritonServer(
            repo, args.http_port, args.grpc_port, args.metrics_port, host=args.host,
            backend_dir=project_root() / ".triton" / "backends", log_file=None,
            model_control_mode=args.model_control_mode,
            load_models=("*",) if args.model_control_mode == "explicit" else (),
        )
        facade = FacadeProcess(FacadeConfig(triton_grpc=server.grpc_url, host=args.host, port=args.openai_port))
        say(f"serving {repo} (model={args.model}, system={args.system}) on http {server.http_url}, grpc {server.grpc_url}")
        try:
            server.start(ready_timeout_s=600)
            if args.openai_port:
                facade.start()
                say(f"OpenAI images API on {facade.url}")
            say("ready; Ctrl-C or SIGTERM stops the server")
            server.process.wait()
        except StopRequested as request:
            say(f"{signal.Signals(request.signum).name}: stopping the server")
        finally:
            facade.stop()
            returncode = server.stop()
    return exit_status(returncode)


if __name__ == "__main__":
    sys.exit(main())
