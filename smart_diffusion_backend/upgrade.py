"""Hot upgrade of a served pipeline (tritonserver in `--model-control-mode=explicit`).

Procedure (each step waits, bounded, for Triton to confirm it):
  1. write the new generation into the served repository (repository.write_upgrade): stage models
     under a new tag (`v2_text_encoder`, ...) and a new version directory of each entry model
     (`smart_diffusion`, `smart_diffusion_stream`, `smart_diffusion_ensemble`) whose config points at
     the new stages — nothing that serves now is touched;
  2. load the new ensemble version, which loads the new stage models next to the old ones (new
     weights or code load here, so a broken upgrade fails before the orchestrators move);
  3. load the orchestrators: Triton brings up the new version, then routes new requests to it and
     unloads the old version once its in-flight requests finish (default version policy: latest 1);
  4. wait until no old entry version is left, then unload the old stage models (nothing calls them
     any more) and wait for their stub processes to exit: their memory goes back to the system.
Clients keep calling the same model names throughout.

Needs tritonclient (HTTP); no Triton server import.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UpgradeError
from .repository import ENSEMBLE, ENTRY_MODELS, ORCHESTRATORS, STAGE_MODEL_PARAMS, write_upgrade
from .serving import child_pids, process_cmdline, rss_bytes


@dataclass
class UpgradeReport:
    old_stages: list[str]
    new_stages: list[str]
    entry_version: int
    rss_before: int  # bytes, server + every stub, before the upgrade
    rss_peak: int  # both generations loaded
    rss_after: int  # old generation unloaded
    old_stub_pids: list[int] = field(default_factory=list)  # all exited at the end
    seconds: dict[str, float] = field(default_factory=dict)


def tree_rss(server_pid: int) -> int:
    return sum(rss_bytes(child_pids(server_pid) | {server_pid}).values())


def stub_pids(server_pid: int, model_name: str, repository: Path) -> list[int]:
    """Python-backend stub processes of one model (their command line names its model.py)."""
    marker = f"{Path(repository).resolve()}/{model_name}/"
    return sorted(p for p in child_pids(server_pid) if marker in process_cmdline(p))


def _wait(what: str, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise UpgradeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _versions(client: Any, name: str) -> dict[str, str]:
    """version -> state for one model, from the repository index."""
    return {
        str(m.get("version", "")): m.get("state", "")
        for m in client.get_model_repository_index()
        if m.get("name") == name
    }


def current_stages(client: Any, entry_model: str) -> list[str]:
    """The stage models the serving orchestrator calls (from its config parameters)."""
    params = client.get_model_config(entry_model).get("parameters", {})
    try:
        return [params[key]["string_value"] for key in STAGE_MODEL_PARAMS]
    except KeyError as exc:
        raise UpgradeError(f"{entry_model} names no stage model {exc}: is it a Smart-Diffusion orchestrator?") from None


def current_gate(client: Any, ensemble: str) -> str:
    """The gate model the serving ensemble calls first (request_gate, or a tagged one)."""
    steps = client.get_model_config(ensemble).get("ensemble_scheduling", {}).get("step", [])
    if not steps:
        raise UpgradeError(f"{ensemble} has no ensemble steps: is it a Smart-Diffusion ensemble?")
    return steps[0]["model_name"]


def hot_upgrade(
    http_url: str,
    repository: Path,
    server_pid: int,
    model_config: str,
    system_config: str,
    tag: str,
    prefix: str = "",
    timeout_s: float = 300.0,
    log: Callable[[str], None] = print,
) -> UpgradeReport:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url, connection_timeout=timeout_s, network_timeout=timeout_s)
    try:
        started = time.monotonic()
        seconds: dict[str, float] = {}
        old_stages = current_stages(client, f"{prefix}{ORCHESTRATORS[0]}") + [current_gate(client, f"{prefix}{ENSEMBLE}")]
        entries = [f"{prefix}{b}" for b in ENTRY_MODELS]
        old_versions = {e: [v for v, s in _versions(client, e).items() if s == "READY"] for e in entries}
        old_pids = sorted({p for m in old_stages for p in stub_pids(server_pid, m, repository)})
        old_entry_pids = sorted({p for m in entries for p in stub_pids(server_pid, m, repository)})
        rss_before = tree_rss(server_pid)

        plan = write_upgrade(repository, model_config, system_config, tag, prefix)
        if set(plan.stages) & set(old_stages):
            raise UpgradeError(f"tag {tag!r} gives the serving stage names {plan.stages}; pick a new tag")
        log(f"1. wrote {plan.stages} and version {plan.entry_version} of {plan.entries}")

        # 2. New stages next to the old ones. Loading the new ensemble version loads them as its
        # composing models; loading them on their own first would make the ensemble load reload
        # them while the orchestrators already call them (seen: tritonserver 2.51 crashed).
        ensemble = f"{prefix}{ENSEMBLE}"
        client.load_model(ensemble)
        _wait("the new stage models", lambda: all(client.is_model_ready(m) for m in plan.stages), timeout_s)
        seconds["load_new_stages"] = round(time.monotonic() - started, 2)
        rss_peak = tree_rss(server_pid)
        log(f"2. loaded {plan.stages}")

        for name in plan.entries:  # 3. switch: the new version serves, the old one drains
            if name != ensemble:
                client.load_model(name)
        version = str(plan.entry_version)

        def switched() -> bool:
            for name in plan.entries:
                states = _versions(client, name)
                if states.get(version) != "READY":
                    return False
                # UNLOADING still finishes in-flight requests (which call the old stages).
                if any(states.get(v) not in (None, "UNAVAILABLE") for v in old_versions[name] if v != version):
                    return False
            return True

        def gone(pids: list[int]) -> Callable[[], bool]:
            return lambda: not any(Path(f"/proc/{p}").exists() and process_cmdline(p) for p in pids)

        _wait(f"version {version} of {plan.entries} to replace the old one", switched, timeout_s)
        # The old orchestrator stubs exit only after their last request: then nothing calls the old stages.
        _wait("the old orchestrator instances to exit", gone(old_entry_pids), timeout_s)
        seconds["switch"] = round(time.monotonic() - started, 2)
        rss_peak = max(rss_peak, tree_rss(server_pid))
        log(f"3. {plan.entries} now serve version {version}")

        for name in old_stages:  # 4. nothing routes to the old stages any more
            client.unload_model(name)
        _wait("the old stage models to unload", lambda: not any(client.is_model_ready(m) for m in old_stages), timeout_s)
        _wait("the old stage stubs to exit", gone(old_pids), timeout_s)
        seconds["unload_old"] = round(time.monotonic() - started, 2)
        rss_after = tree_rss(server_pid)
        log(f"4. unloaded {old_stages}; RSS {rss_before >> 20} -> {rss_peak >> 20} -> {rss_after >> 20} MiB")
        return UpgradeReport(old_stages, plan.stages, plan.entry_version, rss_before, rss_peak, rss_after, old_pids, seconds)
    finally:
        client.close()
