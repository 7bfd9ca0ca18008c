"""Run tritonserver in the foreground on one or more pipelines: `make serve MODEL=... SYSTEM=...`.

With the default model and system the committed model_repository/ is served as is; otherwise a
repository is generated into build/model_repository (model names prefixed per pipeline when
several are served).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from smart_diffusion_backend.params import project_root
from smart_diffusion_backend.repository import DEFAULT_MODEL, DEFAULT_SYSTEM, write_repository
from smart_diffusion_backend.serving import TritonServer



def repository_for(models: list[str], system: str) -> Path:
    if models == [DEFAULT_MODEL] and system == DEFAULT_SYSTEM:
        return project_root() / "model_repository"
    out = project_root() / "build" / "model_repository"
    shutil.rmtree(out, ignore_errors=True)
    write_repository(out, models, system)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("MODEL", DEFAULT_MODEL), help="comma-separated model yamls")
    parser.add_argument("--system", default=os.environ.get("SYSTEM", DEFAULT_SYSTEM))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("HTTP_PORT", 8000)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("GRPC_PORT", 8001)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8002)))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument(
        "--model-control-mode", choices=("none", "explicit"), default=os.environ.get("MODEL_CONTROL_MODE", "none"),
        help="explicit: every model loaded at start, and later loads/unloads through the repository API "
        "(hot upgrade: scripts/hot_upgrade.py, docs/operations.md)",
    )
    args = parser.parse_args()

    repo = repository_for([m for m in args.model.split(",") if m], args.system)
    server = TritonServer(
        repo, args.http_port, args.grpc_port, args.metrics_port, host=args.host,
        backend_dir=project_root() / ".triton" / "backends", log_file=None,
        model_control_mode=args.model_control_mode,
        load_models=("*",) if args.model_control_mode == "explicit" else (),
    )
    print(f"serving {repo} (model={args.model}, system={args.system}) on http {server.http_url}, grpc {server.grpc_url}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.start(ready_timeout_s=600)
    print("ready; Ctrl-C stops the server", flush=True)
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
