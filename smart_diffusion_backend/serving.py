"""Start and stop a real `tritonserver` (the 2.51 build shipped in the nvidia-pytriton wheel).

Used by `make serve`, `make demo`, the integration tests and the benchmarks, so all of them run the
same server the same way. Nothing here imports Triton: the server is a subprocess.

Traps this handles: the Python-backend stub embeds the first `python3` on PATH, so the interpreter's
bin dir goes first; the stub needs the interpreter's libpython and the wheel's bundled libs on
LD_LIBRARY_PATH, or the server hangs never ready — so readiness is polled with a deadline, and on
timeout the server is killed and the log tail raised. Only libpython goes on LD_LIBRARY_PATH, never its
whole LIBDIR: on a GPU host /usr/lib/x86_64-linux-gnu also holds a system cuDNN, which would shadow
torch's bundled one in every stub and pool worker (measured 12 % slower steps on an H100).

Stopping: the server runs in its own session (so stop() can signal it and every stub at once), which
also means a signal to the launcher's process group never reaches it. Two things keep it from
outliving its launcher: the kernel sends it SIGTERM when the launcher dies, however it dies
(PR_SET_PDEATHSIG, set in start()), and launchers wrap their work in `stop_on_signals()`, which turns
the first SIGTERM/SIGINT/SIGHUP into an orderly stop that repeated signals cannot cut short.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ServerError

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region"
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


class StopRequested(SystemExit):
    """Raised in the main thread by the first stop signal inside `stop_on_signals()`.

    A SystemExit, so `except Exception` does not swallow it and an uncaught one exits quietly, with the
    shell's 128 + signal status; on its way out it runs every `with TritonServer` / `finally: stop()`.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Inside the block the first of `signals` raises StopRequested in the main thread; later ones are
    ignored. Previous handlers come back when the block ends.

    One stop request often arrives as several signals: make forwards SIGTERM to its child on top of the
    copy the process group got, and supervisors repeat theirs. Raised again inside stop() before it has
    signalled the server, a second copy would abandon the stop and leave the server running.
    """
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            return
        received.append(signum)
        raise StopRequested(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send `sig` to the child once the calling thread exits, even by
    SIGKILL; None where libc has no prctl (not Linux).

    prctl is looked up here, in the parent, so that the child only makes the call between fork and
    exec. The parent may die before that call: getppid() then no longer names it, and the child leaves.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def pytriton_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: it ships the tritonserver binary (pip install nvidia-pytriton==0.7.0)")
    return Path(list(spec.submodule_search_locations)[0])


def host_has_gpu() -> bool:
    """An NVIDIA driver is loaded (checked without importing torch or CUDA)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def tritonserver_binary() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def prepare_backend_dir(dest: Path) -> Path:
    """A backend directory holding the Python backend and the stub for this interpreter's version."""
    src = pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"no Python backend stub for Python {version} in {src}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for f in (
        src / "backends" / "python" / "libtriton_python.so",
        src / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ):
        target = python_dir / f.name
        if not target.exists() or target.stat().st_size != f.stat().st_size:
            shutil.copy2(f, target)
    return dest


def libpython_dir(dest: Path) -> Path | None:
    """A directory holding only this interpreter's shared libpython (the stub links it), or None where
    the interpreter has none to give (a static build, whose stub then finds nothing either way)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = sysconfig.get_config_var("INSTSONAME") or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    target = Path(libdir) / name
    if not target.is_file():
        return None
    out = dest / "libpython"
    out.mkdir(parents=True, exist_ok=True)
    link = out / name
    if not link.is_symlink() or Path(os.readlink(link)) != target:
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return out


def server_env(backend_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    libpython = libpython_dir(backend_dir)
    libs = [str(libpython) if libpython else "", str(pytriton_dir().parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one this process handed out before: the kernel may offer a port
    again as soon as the probe socket closes, and a server given the same port twice cannot start."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_handed_out:
            _ports_handed_out.add(port)
            return port
    raise ServerError("no free loopback port found")


def shm_regions() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIX)}


def child_pids(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc)."""
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


def group_pids(pgid: int) -> set[int]:
    """Every process in process group `pgid` (from /proc). A server's stubs stay in its group after the
    server died and they were re-parented, where child_pids() no longer finds them."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                found.add(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def mapped_shm_regions(pids: set[int]) -> set[str]:
    """The Python-backend /dev/shm regions these processes have mapped: this server's, not another's."""
    regions = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.rsplit(" ", 1)[-1]
            if path.startswith(f"{SHM_DIR}/{SHM_PREFIX}"):
                regions.add(Path(path).name)
    return regions


def _proc_kib_field(pids: set[int], proc_file: str, field: str) -> dict[int, int]:
    """A "<field>: <n> kB" line of /proc/PID/<proc_file>, in bytes, for each live process."""
    sizes = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/{proc_file}").read_text().splitlines():
                if line.startswith(field):
                    sizes[pid] = int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return sizes


def rss_bytes(pids: set[int]) -> dict[int, int]:
    """Resident set size of each live process."""
    return _proc_kib_field(pids, "status", "VmRSS:")


def pss_bytes(pids: set[int]) -> dict[int, int]:
    """Proportional set size of each live process: a page shared by n processes counts 1/n in each, so the
    sum over a server's tree counts its shared memory regions once (their RSS appears in tritonserver and in
    the stub alike)."""
    return _proc_kib_field(pids, "smaps_rollup", "Pss:")


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class TritonServer:
    """A tritonserver subprocess. Use as a context manager, or start()/stop()."""

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    backend_dir: Path = Path(".triton/backends")
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    exit_timeout_s: int = 20
    # "none": load the whole repository at start (default). "explicit": only `load_models` ("*" =
    # all) at start, then load/unload through the repository API (hot upgrade, scripts/hot_upgrade.py).
    model_control_mode: str = "none"
    load_models: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            *self._host_args(),
            f"--exit-timeout-secs={self.exit_timeout_s}",
            *self._model_control_args(),
            *self.extra_args,
        ]

    @staticmethod
    def _host_args() -> list[str]:
        """CPU-only hosts have no pinned memory or GPU metrics to give; GPU hosts keep Triton's defaults
        (without the pinned pool, inputs of HTTP requests reached Python models corrupted on an H100 host)."""
        if host_has_gpu():
            return []
        return ["--pinned-memory-pool-byte-size=0", "--allow-gpu-metrics=false"]

    def _model_control_args(self) -> list[str]:
        if self.model_control_mode not in ("none", "poll", "explicit"):
            raise ServerError(f"model_control_mode={self.model_control_mode!r}; allowed: none, poll, explicit")
        if self.model_control_mode == "none":
            if self.load_models:
                raise ServerError("load_models needs model_control_mode='explicit'")
            return []
        return [f"--model-control-mode={self.model_control_mode}", *(f"--load-model={m}" for m in self.load_models)]

    def process_tree(self) -> set[int]:
        """The server and every process under it (stubs, pool workers)."""
        if self.process is None:
            return set()
        return child_pids(self.process.pid) | {self.process.pid}

    def start(self, ready_timeout_s: float = 120.0) -> "TritonServer":
        """Start the server and wait until it is ready.

        Its own session, so a stop can signal the server and every stub it spawned. Since group signals
        to the launcher no longer reach it, it gets SIGTERM (Triton drains, then exits; its stubs follow)
        when the thread calling start() exits: call it from a thread that lives as long as the server.
        """
        prepare_backend_dir(Path(self.backend_dir))
        log = open(self.log_file, "ab") if self.log_file else None  # None: inherit our stdout
        self.process = subprocess.Popen(
            self.command(), env=server_env(Path(self.backend_dir)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=parent_death_signal(signal.SIGTERM),
        )
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop(grace_s=5)
            raise
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            # The metrics endpoint starts after HTTP: a scrape right after "ready" could be refused.
            if self.is_ready() and self._metrics_listening():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s; killed it:\n{self.log_tail()}")

    def _metrics_listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.metrics_port), timeout=2):
                return True
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return "(no log file)"
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains and unloads models), then SIGKILL the whole group after `grace_s`.

        Another exception raised meanwhile (a second Ctrl-C without `stop_on_signals`) cuts the drain
        short but still kills the group and waits for it; a StopRequested lets the drain finish first,
        then goes on. A killed server cannot unlink its stubs' shared-memory regions; those they had
        mapped are removed here.
        """
        grace_s = self.exit_timeout_s + 10 if grace_s is None else grace_s
        if self.process is None:
            return None
        proc, self.process = self.process, None
        deadline = time.monotonic() + grace_s
        ours: set[str] = set()
        stop_request: StopRequested | None = None
        try:
            try:
                ours = mapped_shm_regions(child_pids(proc.pid) | {proc.pid})
                self._drain(proc, deadline)
            except StopRequested as request:  # asked to stop while stopping: this drain is that stop
                stop_request = request
                self._drain(proc, deadline)
        except subprocess.TimeoutExpired:
            pass
        finally:
            ours |= mapped_shm_regions(group_pids(proc.pid))  # stubs, re-parented or started after the first look
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stubs and pool workers that outlived the server
            except ProcessLookupError:
                pass
            proc.wait()
            if proc.returncode != 0:
                for name in ours & shm_regions():
                    (SHM_DIR / name).unlink(missing_ok=True)
        if stop_request is not None:
            raise stop_request
        return proc.returncode

    @staticmethod
    def _drain(proc: subprocess.Popen, deadline: float) -> None:
        """SIGTERM and wait until `deadline`; Triton takes a repeated SIGTERM as the same request."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
