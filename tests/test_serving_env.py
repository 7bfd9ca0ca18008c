"""The environment and flags the server (and so every stub and pool worker) starts with."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from smart_diffusion_backend.serving import TritonServer, host_has_gpu, libpython_dir, server_env


def test_only_libpython_goes_on_the_library_path(tmp_path: Path) -> None:
    # The interpreter's whole LIBDIR would let system CUDA libraries there shadow torch's bundled ones.
    env = server_env(tmp_path / "backends", base={"PATH": "/usr/bin"})
    entries = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert sysconfig.get_config_var("LIBDIR") not in entries
    private = tmp_path / "backends" / "libpython"
    assert entries[0] == str(private)
    (link,) = private.iterdir()
    assert link.is_symlink() and link.name == sysconfig.get_config_var("INSTSONAME")
    assert link.resolve() == (Path(sysconfig.get_config_var("LIBDIR")) / link.name).resolve()
    assert entries[1].endswith("nvidia_pytriton.libs")
    assert env["PATH"].startswith(str(Path(os.sys.executable).parent))


def test_a_stale_libpython_link_is_replaced(tmp_path: Path) -> None:
    first = libpython_dir(tmp_path)
    name = sysconfig.get_config_var("INSTSONAME")
    (first / name).unlink()
    (first / name).symlink_to(tmp_path / "elsewhere.so")
    again = libpython_dir(tmp_path)
    assert (again / name).resolve() == (Path(sysconfig.get_config_var("LIBDIR")) / name).resolve()


def test_cpu_hosts_turn_off_pinned_memory_and_gpu_metrics(tmp_path: Path) -> None:
    command = TritonServer(tmp_path).command()
    gpu_only = {"--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"}
    if host_has_gpu():
        assert not gpu_only & set(command)
    else:
        assert gpu_only <= set(command)
