"""Where a kernel's warps spend their time, by code region, from Nsight Compute's per-instruction source page.

    ncu --import REPORT.ncu-rep --page source --csv --print-source sass > source.csv
    python -m bench.ncu_regions source.csv [--min-share 0.5] [--out regions.md]

A region is a run of consecutive SASS instructions that executed the same number of times: a loop body, a
prologue, a per-tile epilogue, or idle warps parked at the exit (executed once per warp). For each region the
table gives its share of the warp-stall samples, how often its instructions ran, its first and last instruction,
and the stall reasons that take at least 10 % of its samples. `scripts/gpu_served_bench.sh profile` runs it on the
attention kernel; bench/results/attention/attention-h100.md reads one such table.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Region:
    first: int  # index of its first instruction in the listing
    last: int
    executed: int  # times each of its instructions ran (summed over warps)
    samples: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_source: str = ""
    last_source: str = ""


def _number(text: str) -> int:
    text = text.replace(",", "").strip()
    return int(float(text)) if text not in ("", "-") else 0


def read_regions(path: Path) -> tuple[str, list[Region]]:
    """The kernel's name and its regions, in listing order."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header_at = next((i for i, row in enumerate(rows) if "Address" in row and "Source" in row), None)
    if header_at is None:
        raise ValueError(f"{path}: no 'Address,Source,...' header; export with --page source --csv")
    kernel = next((row[1] for row in rows[:header_at] if len(row) > 1 and row[0] == "Kernel Name"), "?")
    header = rows[header_at]
    missing = [name for name in (SAMPLES, EXECUTED) if name not in header]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; profile with --set full (source counters)")
    samples_col, executed_col, source_col = header.index(SAMPLES), header.index(EXECUTED), header.index("Source")
    reason_cols = {name[len("stall_"):]: i for i, name in enumerate(header)
                   if name.startswith("stall_") and "Not Issued" not in name}
    regions: list[Region] = []
    for index, row in enumerate(rows[header_at + 1:]):
        if len(row) < len(header):
            continue
        executed = _number(row[executed_col])
        if not regions or regions[-1].executed != executed:
            regions.append(Region(index, index, executed, first_source=row[source_col].strip()))
        region = regions[-1]
        region.last, region.last_source = index, row[source_col].strip()
        region.samples += _number(row[samples_col])
        for reason, col in reason_cols.items():
            count = _number(row[col])
            if count:
                region.reasons[reason] = region.reasons.get(reason, 0) + count
    return kernel, regions


def table(kernel: str, regions: list[Region], min_share: float) -> str:
    total = sum(r.samples for r in regions) or 1
    lines = [f"Warp-stall samples of `{kernel}` by region ({total:,} samples; regions under {min_share} % left out)",
             "", "| instructions | executed each | share | first | last | main stall reasons |",
             "|---|---|---|---|---|---|"]
    for r in regions:
        share = 100 * r.samples / total
        if share < min_share:
            continue
        main = ", ".join(f"{name} {100 * n / r.samples:.0f} %" for name, n in
                         sorted(r.reasons.items(), key=lambda item: -item[1]) if n >= 0.1 * r.samples)
        lines.append(f"| {r.first}–{r.last} ({r.last - r.first + 1}) | {r.executed:,} | {share:.1f} % | "
                     f"`{r.first_source[:40]}` | `{r.last_source[:40]}` | {main} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source_csv", type=Path)
    parser.add_argument("--min-share", type=float, default=0.5, help="hide regions below this %% of the samples")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table(*read_regions(args.source_csv), args.min_share)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
