"""bench/ncu_regions.py: code regions and their stall samples from an Nsight Compute source-page export."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ncu_regions", Path(__file__).parents[1] / "bench" / "ncu_regions.py")
ncu_regions = importlib.util.module_from_spec(_spec)
sys.modules["ncu_regions"] = ncu_regions  # dataclasses look their module up there
_spec.loader.exec_module(ncu_regions)

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
          '"Instructions Executed","stall_barrier","stall_long_sb","stall_wait","stall_wait (Not Issued)"')


def write_export(tmp_path: Path, rows: list[tuple[str, int, int, int, int, int]]) -> Path:
    # (source, samples, executed, barrier, long_sb, wait)
    lines = ['"Kernel Name","_attn_fwd_hopper",', HEADER]
    for i, (source, samples, executed, barrier, long_sb, wait) in enumerate(rows):
        lines.append(f'"0x{i:04x}","  {source}","{samples}","{samples}","{executed:,}","{barrier}","{long_sb}",'
                     f'"{wait}","{wait}"')
    path = tmp_path / "source.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_regions_are_runs_of_equal_execution_counts(tmp_path):
    path = write_export(tmp_path, [
        ("S2R R0, SR_TID.X", 2, 528, 0, 2, 0),        # prologue
        ("HGMMA.64x128x16", 30, 101376, 0, 0, 30),    # loop body
        ("@!P1 BRA 0x10", 50, 101376, 10, 40, 0),     # loop body, mbarrier wait
        ("NOP", 18, 266, 18, 0, 0),                   # idle warps at the exit
        ("FMUL R1, R2, 0.25", 0, 528, 0, 0, 0),       # same count as the prologue, but not next to it
    ])
    kernel, regions = ncu_regions.read_regions(path)
    assert kernel == "_attn_fwd_hopper"
    assert [(r.first, r.last, r.executed, r.samples) for r in regions] == [
        (0, 0, 528, 2), (1, 2, 101376, 80), (3, 3, 266, 18), (4, 4, 528, 0)]
    assert regions[1].reasons == {"long_sb": 40, "wait": 30, "barrier": 10}  # "(Not Issued)" columns left out

    text = ncu_regions.table(kernel, regions, min_share=5.0)
    assert "100 samples" in text
    loop_row = next(line for line in text.splitlines() if line.startswith("| 1–2 (2)"))
    assert "80.0 %" in loop_row and "long_sb 50 %, wait 38 %, barrier 12 %" in loop_row
    assert "| 0–0 (1)" not in text  # 2 % of the samples: under --min-share


def test_an_export_without_source_counters_is_refused(tmp_path):
    path = tmp_path / "details.csv"
    path.write_text('"ID","Kernel Name","Metric Name"\n"0","k","Duration"\n')
    with pytest.raises(ValueError, match="--page source"):
        ncu_regions.read_regions(path)
