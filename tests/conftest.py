"""Shared fixtures: the tiny models on disk and a real tritonserver on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_flux():
    """ModelParams of the tiny Flux; builds its weights if they are missing."""
    from smart_diffusion_backend.params import ModelParams

    model = ModelParams.load("tiny-flux")
    if not (model.weights / "model_index.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_models.py"), "tiny-flux"], check=True)
    return model


@pytest.fixture(scope="session")
def cpu_system():
    from smart_diffusion_backend.params import SystemParams

    return SystemParams.load("cpu")


def child_pids(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc), to prove a stopped server left nothing behind."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


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


def stop_server_and_check(server, shm_before) -> None:
    """Stop gracefully; fail loudly if the server needed a kill or left processes or /dev/shm files."""
    from smart_diffusion_backend.serving import shm_regions

    pid = server.process.pid
    leftover_children = child_pids(pid)
    code = server.stop()
    alive = [p for p in leftover_children if Path(f"/proc/{p}").exists()]
    leaked = shm_regions() - shm_before
    assert code == 0, f"tritonserver exit code {code}:\n{server.log_tail()}"
    assert not alive, f"processes left after server exit: {alive}"
    assert not leaked, f"/dev/shm regions left after server exit: {sorted(leaked)}"


@pytest.fixture(scope="session")
def server(tiny_flux, tmp_path_factory):
    """The committed model_repository served by a real tritonserver (default pipeline, CPU)."""
    tmp = tmp_path_factory.mktemp("server")
    srv, shm_before = start_server(ROOT / "model_repository", tmp)
    try:
        yield srv
    finally:
        stop_server_and_check(srv, shm_before)
