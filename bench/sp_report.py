"""Markdown tables from bench.sp_bench's JSON lines: one table per model and run, time per forward by GPU count
and mode, speed-ups over the same run's 1-GPU times, and ours vs diffusers at each point.

    python -m bench.sp_report bench/results/sequence-parallel/sp_flux-h100x2.jsonl [more.jsonl ...] [--out table.md]

A run is the lines after one header line (sp_bench writes a header per invocation), so every ratio compares
numbers from the same machine and the same call.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.report import emit

_DIFFUSERS = {False: "diffusers", True: "diffusers+compile"}


def _baseline(mode: str, times: dict) -> float | None:
    """The same run's 1-GPU time of the same kind: a compiled mode over ours+compile (or ours+<its suffix> if
    that ran), eager modes over ours."""
    suffix = mode.partition("+")[2]
    for candidate in ([f"ours+{suffix}"] if suffix else []) + (["ours+compile"] if "compile" in suffix else []) + ["ours"]:
        if (candidate, 1) in times:
            return times[(candidate, 1)]
    return None


def read_runs(path: Path) -> list[tuple[dict, list[dict]]]:
    runs: list[tuple[dict, list[dict]]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "command" in record:
            runs.append((record, []))
        elif runs and "mode" in record:
            runs[-1][1].append(record)
    return runs


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def run_table(header: dict, rows: list[dict]) -> list[str]:
    times = {(r["mode"], r["gpus"]): r["median_s"] for r in rows if "median_s" in r}
    errors = [r for r in rows if "error" in r]
    model = rows[0].get("model", "?") if rows else "?"
    modes = list(dict.fromkeys(r["mode"] for r in rows if "median_s" in r))
    gpus = sorted({g for _, g in times})
    lines = [f"### {model}: {header.get('device', '?')}, {header.get('time', '?')}", "",
             f"`{header.get('command', '')}`", "",
             "| mode | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |",
             "|---|" + "---|" * len(gpus)]
    for mode in modes:
        base = _baseline(mode, times)
        cells = []
        for g in gpus:
            t = times.get((mode, g))
            if t is None:
                cells.append("")
            elif g > 1 and base:
                cells.append(f"{_fmt(t)} ({base / t:.2f}×)")
            else:
                cells.append(_fmt(t))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Speed-ups are over the same run's 1-GPU `ours` of the same kind (`ours+compile` for compiled "
              "modes)."]
    versus = []
    for mode, g in times:
        if mode.startswith("diffusers"):
            continue
        rival = times.get((_DIFFUSERS["+compile" in mode], g))
        if rival is not None:
            faster = rival / times[(mode, g)]
            versus.append(f"{mode} on {g}: {faster:.2f}×")
    if versus:
        lines.append("Ours vs diffusers at the same GPU count, eager vs `diffusers`, compiled vs `diffusers+compile` "
                     "(>1: ours faster): " + "; ".join(sorted(versus)) + ".")
    for r in errors:
        lines.append(f"- {r['mode']} on {r['gpus']} GPUs failed: {r['error'][:200]}")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines: list[str] = []
    for path in args.jsonl:
        for header, rows in read_runs(path):
            if rows:
                lines += run_table(header, rows)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
