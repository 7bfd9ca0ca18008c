"""Shared fixtures: the tiny models on disk and a real tritonserver on free ports."""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _workers_only_in_pool_tests(request, monkeypatch):
    """`make test-fast` (SMART_DIFFUSION_FORBID_WORKERS=1) runs no test that starts worker processes: one
    that does without the `pool` marker fails here, so the marker stays true."""
    if os.environ.get("SMART_DIFFUSION_FORBID_WORKERS") and "pool" not in request.keywords:
        def refuse(process):
            raise RuntimeError(f"{request.node.nodeid} starts a worker process: mark it @pytest.mark.pool")

        monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


def ensure_tiny_model(name: str):
    """ModelParams of a tiny model (its yaml name); builds its weights with scripts/build_tiny_models.py, in a
    process of its own, if they are missing."""
    from smart_diffusion_backend.params import ModelParams

    model = ModelParams.load(name)
    if not (model.weights / "model_index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_models.py"), name], check=True)
    return model


@pytest.fixture(scope="session")
def tiny_flux():
    """ModelParams of the tiny Flux; builds its weights if they are missing."""
    return ensure_tiny_model("tiny-flux")


@pytest.fixture(scope="session")
def cpu_system():
    from smart_diffusion_backend.params import SystemParams

    return SystemParams.load("cpu")


def _describe(pid: int) -> str | None:
    """'pid state cmdline' of a live (non-zombie) process, or None."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return None
    return None if state == "Z" else f"{pid} {state} {cmdline[:200]}"


def _still_running(pids: set[int], grace_s: float = 5.0) -> list[str]:
    """Processes of `pids` still running after a short grace (an orphan is reaped by init, not at once)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [d for d in map(_describe, sorted(pids)) if d]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def system_yaml_with(base: str, path: Path, **overrides) -> Path:
    """configs/system/<base>.yaml with some keys replaced, written to `path` (for a server fixture)."""
    lines = (ROOT / "configs" / "system" / f"{base}.yaml").read_text().splitlines()
    kept = [line for line in lines if line.split(":", 1)[0].strip() not in overrides]
    path.write_text("\n".join(kept + [f"{key}: {value}" for key, value in overrides.items()]) + "\n")
    return path


def start_server(repo: Path, tmp_dir: Path, **kwargs):
    from smart_diffusion_backend.serving import TritonServer, free_port, shm_regions

    shm_before = shm_regions()
    server = TritonServer(
        repo,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        backend_dir=ROOT / ".triton" / "backends",
        log_file=tmp_dir / "tritonserver.log",
        **kwargs,
    )
    server.start(ready_timeout_s=300)
    return server, shm_before


def stop_server_and_check(server, shm_before=None) -> None:
    """Stop gracefully; fail loudly if the server needed a kill or left processes or /dev/shm files."""
    from smart_diffusion_backend.serving import child_pids, mapped_shm_regions, shm_regions

    pid = server.process.pid
    leftover_children = child_pids(pid)
    ours = mapped_shm_regions(leftover_children | {pid})
    assert ours, "found no shared-memory region mapped by the server: the leak check would be vacuous"
    code = server.stop()
    alive = _still_running(leftover_children)
    leaked = shm_regions() & ours
    assert code == 0, f"tritonserver exit code {code}:\n{server.log_tail()}"
    assert not alive, f"processes left after server exit: {alive}"
    assert not leaked, f"/dev/shm regions left after server exit: {sorted(leaked)}"


@contextlib.contextmanager
def serving(models: list[str], tmp: Path, system: str = "cpu", **kwargs):
    """A real tritonserver serving `models` (yaml names or paths) under `system`, from a repository written in
    `tmp`; stopped and checked for leftovers (stop_server_and_check) on exit. kwargs go to TritonServer."""
    from smart_diffusion_backend.repository import write_repository

    write_repository(tmp / "repo", models, system)
    srv, shm_before = start_server(tmp / "repo", tmp, **kwargs)
    try:
        yield srv
    finally:
        stop_server_and_check(srv, shm_before)


@pytest.fixture(scope="session")
def server(tiny_flux, tmp_path_factory):
    """tiny-flux served by a real tritonserver (CPU), from a repository generated exactly as the committed
    default one is; the tiny model keeps the bit-exactness tests fast."""
    with serving(["tiny-flux"], tmp_path_factory.mktemp("server")) as srv:
        yield srv
