"""Stopping a launcher stops its server and the OpenAI facade beside it: nothing of them (processes,
ports, /dev/shm regions) outlives SIGTERM, SIGINT or SIGHUP to `make serve`'s process group, a SIGKILL
of make and the launcher, or SIGTERM to scripts/demo.py while it starts the server.

The server runs in its own session, so none of these signals reaches it directly: the launcher's
orderly stop (serving.stop_on_signals) or the kernel's parent-death signal must take it down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smart_diffusion_backend.serving import child_pids, free_port, mapped_shm_regions, process_cmdline, shm_regions

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
GONE_WITHIN_S = 30.0  # the server's default --exit-timeout-secs is 20
START_TIMEOUT_S = 300.0


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _group(pgid: int) -> set[int]:
    """Running members of a process group: a server's stubs stay in it, also those started after a snapshot."""
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)):
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.add(int(entry.name))
            except ProcessLookupError:
                continue
    return members


def _port_free(port: int) -> bool:
    """Bindable as a restarted server binds it: SO_REUSEADDR, so a closed connection's TIME_WAIT is no leak."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _facade_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _wait_for(condition: Callable[[], bool], launcher: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        if launcher.poll() is not None:
            pytest.fail(f"launcher exited with {launcher.returncode} before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


class Snapshot:
    """A launcher's process tree, the ports it serves and the /dev/shm regions its server mapped; the
    server's process group counts too."""

    def __init__(self, launcher_pid: int, ports: list[int]) -> None:
        self.pids = child_pids(launcher_pid) | {launcher_pid}
        self.cmdlines = {pid: process_cmdline(pid) for pid in self.pids}
        self.ports = ports
        self.regions = mapped_shm_regions(self.pids)
        self.server_groups = {p for p in self.servers() if "tritonserver" in self.cmdlines[p]}  # session leaders

    def servers(self) -> list[int]:
        return [p for p, c in self.cmdlines.items() if "tritonserver" in c or "triton_python_backend_stub" in c]

    def leftovers(self) -> list[str]:
        running = {p for p in self.pids if _alive(p)}
        for pgid in self.server_groups:
            running |= _group(pgid)
        return (
            [f"process {p} {process_cmdline(p)[:150]}" for p in sorted(running)]
            + [f"port {p} in use" for p in self.ports if not _port_free(p)]
            + [f"/dev/shm/{r}" for r in sorted(self.regions & shm_regions())]
        )

    def wait_gone(self, timeout_s: float = GONE_WITHIN_S) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def remove(self) -> None:
        """SIGKILL what is left (only processes still running the same command) and unlink the regions."""
        for pgid in self.server_groups:
            if _group(pgid):
                os.killpg(pgid, signal.SIGKILL)
        for pid in self.pids:
            if _alive(pid) and process_cmdline(pid) == self.cmdlines[pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for name in self.regions & shm_regions():
            (Path("/dev/shm") / name).unlink(missing_ok=True)


@pytest.fixture
def snapshots() -> Iterator[list[Snapshot]]:
    """Whatever a failing test left behind is removed, so that the rest of the suite starts clean."""
    taken: list[Snapshot] = []
    yield taken
    for snap in taken:
        snap.remove()


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _serve_child(make_pid: int) -> int:
    (pid,) = [p for p in child_pids(make_pid) if "scripts/serve.py" in process_cmdline(p)]
    return pid


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGHUP", "SIGKILL"])
def test_make_serve_leaves_nothing_behind(how: str, tmp_path: Path, snapshots: list[Snapshot]) -> None:
    """SIGTERM/SIGINT/SIGHUP to make's process group (docker, systemd, CI timeouts, Ctrl-C, a closed
    terminal), or SIGKILL of make and scripts/serve.py: within the server's exit timeout no process,
    port or /dev/shm region of it is left."""
    ports = [free_port(), free_port(), free_port(), free_port()]  # HTTP, gRPC, metrics, OpenAI facade
    log = tmp_path / "make-serve.log"
    make = _start(["make", "--no-print-directory", "serve", f"HTTP_PORT={ports[0]}", f"GRPC_PORT={ports[1]}",
                   f"METRICS_PORT={ports[2]}", f"OPENAI_PORT={ports[3]}"], log)
    try:
        _wait_for(lambda: _ready(ports[0]) and _facade_ready(ports[3]), make, log, "ready server and facade")
        snap = Snapshot(make.pid, ports)
        snapshots.append(snap)
        assert snap.servers() and snap.regions, f"no server tree or shm regions found under make: {snap.cmdlines}"
        launcher = _serve_child(make.pid)
        if how == "SIGKILL":
            os.kill(launcher, signal.SIGKILL)
            os.kill(make.pid, signal.SIGKILL)
        else:
            os.killpg(make.pid, getattr(signal, how))
            if how == "SIGTERM":
                # make forwards SIGTERM to its child on top of the group's copy, supervisors repeat
                # theirs: copies landing while the launcher stops the server must not cut the stop short.
                for _ in range(100):
                    time.sleep(0.005)
                    if "scripts/serve.py" not in process_cmdline(launcher):  # exited (a zombie has none)
                        break
                    os.kill(launcher, signal.SIGTERM)
        left = snap.wait_gone()
        assert not left, f"left {GONE_WITHIN_S:.0f} s after {how}: {left}\n{log.read_text()[-3000:]}"
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        make.wait()


def test_demo_stopped_while_starting_leaves_nothing_behind(tmp_path: Path, snapshots: list[Snapshot]) -> None:
    """SIGTERM to scripts/demo.py while its server loads the models: the demo stops the server in order
    (exit status 128 + 15, not killed by the signal) and leaves nothing behind."""
    ports = [free_port(), free_port(), free_port()]
    log = tmp_path / "demo.log"
    demo = _start([sys.executable, "scripts/demo.py", "--out", str(tmp_path / "demo.png"), "--http-port", str(ports[0]),
                   "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])], log)
    try:
        # A stub has mapped its region: the server is up and loading models.
        _wait_for(lambda: bool(mapped_shm_regions(child_pids(demo.pid))), demo, log, "loading server")
        snap = Snapshot(demo.pid, ports)
        snapshots.append(snap)
        assert snap.servers() and snap.regions, f"no server tree or shm regions found under the demo: {snap.cmdlines}"
        demo.send_signal(signal.SIGTERM)
        left = snap.wait_gone()
        assert not left, f"left {GONE_WITHIN_S:.0f} s after SIGTERM: {left}\n{log.read_text()[-3000:]}"
        assert demo.wait(timeout=10) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.wait()


def test_stop_on_signals_raises_once_then_ignores_repeats_and_restores_handlers() -> None:
    from smart_diffusion_backend.serving import StopRequested, stop_on_signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    codes = []
    with stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except StopRequested as request:
            codes.append(request.code)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the stop is under way: ignored
                os.kill(os.getpid(), sig)
            time.sleep(0.1)
    assert codes == [128 + signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before
