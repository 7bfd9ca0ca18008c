"""The Hopper (Gluon) attention kernel on a CPU machine: its addressing and routing, and an ahead-of-time
compile for sm_90 through Triton's own compiler and bundled ptxas.

Gluon has no interpreter, so its numerics are checked on the GPU by bench/attention_bench.py (every check
row there names the kernel that ran); bench/results/attention/attention-h100.md holds the last run.
"""

from __future__ import annotations

import functools
import importlib
import re

import pytest
import torch

from smart_diffusion_backend.kernels.common import QUANT_BLOCK
from smart_diffusion_backend.kernels.hopper_attention import (
    BLOCK_M,
    STAGES,
    RowView,
    compile_for_sm90,
    hopper_supports,
    row_view,
)

# the modules (the package re-exports a function under the portable module's name)
dispatch_module = importlib.import_module("smart_diffusion_backend.kernels.attention")
flash_module = importlib.import_module("smart_diffusion_backend.kernels.flash_attention")
hopper_module = importlib.import_module("smart_diffusion_backend.kernels.hopper_attention")


@functools.lru_cache(maxsize=None)
def _compiled_once(head_dim: int, qk_int8: bool, stages: int, persistent: bool) -> dict:
    return compile_for_sm90(head_dim, qk_int8=qk_int8, stages=stages, persistent=persistent)


def compiled_for_sm90(head_dim: int, *, qk_int8: bool = False, stages: int = STAGES, persistent: bool = False) -> dict:
    """compile_for_sm90, once per variant for the whole module (each compile takes seconds)."""
    return _compiled_once(head_dim, qk_int8, stages, persistent)


def test_heads_outer_layout_maps_to_one_row_per_token_and_head():
    t = torch.empty(2, 3, 100, 128, dtype=torch.bfloat16)
    assert row_view(t) == RowView(rows=600, width=128, row_stride=128, rows_per_batch=300, rows_per_head=100,
                                  cols_per_head=0)


def test_heads_inner_layout_is_read_without_a_copy():
    # diffusers' processors hand attention a [B, S, H, D] tensor seen through transpose(1, 2)
    t = torch.empty(2, 100, 3, 128, dtype=torch.bfloat16).transpose(1, 2)
    assert row_view(t) == RowView(rows=200, width=384, row_stride=384, rows_per_batch=100, rows_per_head=0,
                                  cols_per_head=128)


def test_slice_of_a_fused_projection_keeps_its_row_stride():
    qkv = torch.empty(2, 100, 3 * 4 * 64, dtype=torch.float16)
    q = qkv[..., : 4 * 64].unflatten(-1, (4, 64)).transpose(1, 2)  # [2, 4, 100, 64], rows 768 elements apart
    assert row_view(q) == RowView(rows=200, width=256, row_stride=768, rows_per_batch=100, rows_per_head=0,
                                  cols_per_head=64)


@pytest.mark.parametrize("make", [
    lambda: torch.empty(2, 3, 100, 128, dtype=torch.bfloat16).transpose(2, 3).transpose(2, 3)[..., ::2],
    lambda: torch.empty(1, 128, 3, 100, dtype=torch.bfloat16).permute(0, 2, 3, 1),  # head_dim not contiguous
    lambda: torch.empty(2, 3, 100, 132, dtype=torch.bfloat16)[..., :128],  # rows 264 B apart: TMA needs 16 B
], ids=["every-other-element", "head-dim-strided", "unaligned-row-stride"])
def test_strides_tma_cannot_read_have_no_view(make):
    assert row_view(make()) is None


def test_cpu_float32_odd_head_dim_and_per_batch_lengths_stay_on_the_portable_kernel():
    q = torch.empty(1, 2, 64, 128, dtype=torch.bfloat16)
    assert not hopper_supports(q, q, q, None)  # not a CUDA tensor
    assert not hopper_supports(q.float(), q.float(), q.float(), None)
    assert not hopper_supports(q, q, q, torch.tensor([10]))


@pytest.mark.parametrize("head_dim,persistent", [(64, False), (128, False), (128, True)])
def test_kernel_compiles_for_sm90_with_tma_and_wgmma(head_dim, persistent):
    compiled = compiled_for_sm90(head_dim, persistent=persistent)
    assert compiled["wgmma"] > 0 and compiled["tma_loads"] > 0 and compiled["int8_wgmma"] == 0
    assert "setmaxnreg" in compiled["ptx"]  # the producer gives its registers to the consumers
    assert "registers" in compiled["ptxas"]  # ptxas assembled it for sm_90a
    # Q (two buffers when persistent: the next tile's loads during this one), a 2-stage K ring and a 2-stage V
    # ring, 2 bytes per element
    q_buffers = 2 if persistent else 1
    assert compiled["shared_bytes"] >= 2 * (q_buffers * 128 * head_dim + 4 * 128 * head_dim)
    # O leaves in 16-byte stores, whole rows per warp: 64 rows x head_dim x 2 bytes / 128 threads per partition
    assert compiled["ptx"].count("st.global.v4.b32") == 2 * 64 * head_dim * 2 // (128 * 16)


def _spill_store_bytes(ptxas_report: str) -> int:
    return int(re.search(r"(\d+) bytes spill stores", ptxas_report).group(1))


@pytest.mark.parametrize("stages,persistent", [(2, True), (3, False)])
def test_int8_qk_variant_compiles_to_int8_wgmma_without_spilling_the_loop(stages, persistent):
    # The SageAttention-1 variant (precision="int8" on sm_90): int8 Q.K^T, bf16 P.V
    compiled = compiled_for_sm90(128, qk_int8=True, stages=stages, persistent=persistent)
    assert 0 < compiled["int8_wgmma"] < compiled["wgmma"]
    # A persistent CTA holds two tiles' state where they meet (the next S_0 beside this tile's last P.V): ptxas
    # spills a few words there, not the 64-register tiles (the bf16 kernel's profile at 4,224 tokens counted 96
    # local-memory requests per CTA over its 6 query tiles).
    assert _spill_store_bytes(compiled["ptxas"]) <= (64 if persistent else 0)
    # scores become float by bit arithmetic, not one cvt each (the bf16 kernel's prologue has 4)
    assert compiled["ptx"].count("cvt.rn.f32.s32") <= 8
    # int8 Q (16 KiB) and the stages of int8 K (16 KiB) and bf16 V (32 KiB)
    assert compiled["shared_bytes"] >= 128 * 128 + stages * (128 * 128 + 2 * 128 * 128)


def _kv_loops(sass: str) -> list[list[str]]:
    """The instructions of each K/V loop in nvdisasm's SASS: the innermost loops (a conditional backward branch
    to a label; the unconditional ones come back from the mbarrier waits' retry code) that issue wgmmas."""
    label_at, instructions, pending = {}, [], None
    for line in sass.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            pending = label.group(1)
            continue
        instruction = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if instruction:
            address = int(instruction.group(1), 16)
            if pending:
                label_at[pending], pending = address, None
            instructions.append((address, instruction.group(2)))
    loops = []  # (first address, last address) of each loop with a wgmma in it
    for address, text in instructions:
        target = re.search(r"^@!?U?P\d\s+BRA\s+`\(\.(L_x_\d+)\)", text)
        if target and label_at.get(target.group(1), address) < address:
            start = label_at[target.group(1)]
            if any("HGMMA" in t for a, t in instructions if start <= a <= address):
                loops.append((start, address))
    innermost = [(start, end) for start, end in loops
                 if not any((s, e) != (start, end) and start <= s and e <= end for s, e in loops)]
    return [[t for a, t in instructions if start <= a <= end] for start, end in innermost]


@pytest.mark.parametrize("int8,persistent", [(False, True), (False, False), (True, True)])
def test_kv_loop_keeps_everything_in_registers(int8, persistent):
    # A variant whose K/V loop reloaded the shared-memory base from the stack (2 local loads per iteration, after
    # an unrelated change elsewhere in the kernel) ran 2.5 % slower at 4,224 tokens
    # (bench/results/attention/attention-h100.md): the loop of each consumer partition must not touch local memory.
    sass = compiled_for_sm90(128, qk_int8=int8, persistent=persistent)["sass"]
    loops = _kv_loops(sass)
    assert len(loops) == 2  # one per consumer partition
    for body in loops:
        assert sum("HGMMA" in t for t in body) >= 2  # Q.K^T and P.V
        assert not [t for t in body if t.startswith(("LDL", "STL"))]


def test_one_q_scale_per_consumer_partition():
    # quantize_qk's scale blocks must match the 64 query rows a consumer partition owns
    assert QUANT_BLOCK == BLOCK_M // 2


@pytest.mark.parametrize("precision,routed", [("int8", True), ("fp8", False)])
def test_quantised_calls_take_the_hopper_kernel_only_for_int8(monkeypatch, precision, routed):
    # Gluon cannot run on a CPU: stand in for the sm_90 check and the launch, keep the routing real.
    calls = []
    monkeypatch.setattr(dispatch_module, "interpreting", lambda: False)
    monkeypatch.setattr(dispatch_module, "hopper_supports", lambda q, k, v, kv_len: True)
    monkeypatch.setattr(dispatch_module, "hopper_int8_attention", lambda *args: calls.append(args) or (args[0], None))
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)

    class PortablePath(Exception):
        pass

    def portable_quantisation(*args, **kwargs):
        raise PortablePath

    monkeypatch.setattr(flash_module, "quantize_qk", portable_quantisation)
    if routed:
        dispatch_module._launch_quantized(q, q, q, 0.125, 7, True, precision)
        assert len(calls) == 1 and calls[0][3:6] == (0.125, 7, True)
    else:
        with pytest.raises(PortablePath):
            dispatch_module._launch_quantized(q, q, q, 0.125, 7, True, precision)
        assert calls == []


@pytest.mark.parametrize("interpreter,supported,taken", [(False, True, "hopper"), (False, False, "portable"),
                                                         (True, True, "portable")])
def test_bf16_calls_take_the_hopper_kernel_where_it_fits(monkeypatch, interpreter, supported, taken):
    # the dispatcher's choice alone: both kernels stood in for
    calls = []
    monkeypatch.setattr(dispatch_module, "interpreting", lambda: interpreter)
    monkeypatch.setattr(dispatch_module, "hopper_supports", lambda q, k, v, kv_len: supported)
    monkeypatch.setattr(dispatch_module, "hopper_attention", lambda *args: calls.append("hopper") or (args[0], None))
    monkeypatch.setattr(dispatch_module, "portable_attention",
                        lambda *args: calls.append("portable") or (args[0], None))
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    dispatch_module._launch_bf16(q, q, q, 0.125, None, False)
    assert calls == [taken]


def test_int_to_float_bit_arithmetic_is_exact_over_the_int8_score_range():
    # _scores turns int32 Q8.K8^T into float32 as (s + bits(1.5 * 2^23)) seen as float, minus 1.5 * 2^23.
    # Scores of int8 vectors of length <= 128 stay within 128 * 128 * 128 = 2^21; the trick holds to 2^22.
    bits, value = hopper_module._INT_TO_FLOAT_BITS, hopper_module._INT_TO_FLOAT_VALUE
    assert torch.tensor([bits], dtype=torch.int32).view(torch.float32).item() == value
    limit = 2**22 - 1
    edges = torch.tensor([-limit, -(2**21), -1, 0, 1, 2**21, limit], dtype=torch.int32)
    scores = torch.cat([edges, torch.randint(-limit, limit + 1, (100_000,), dtype=torch.int32,
                                             generator=torch.Generator().manual_seed(0))])
    converted = (scores + bits).view(torch.float32) - value
    assert torch.equal(converted, scores.to(torch.float32))
    # the kernel spells the constants out
    import inspect

    source = inspect.getsource(hopper_module._scores.fn)
    assert str(bits) in source and repr(value) in source


def _fake_quantize_qk(q, k, scale, kv_len, int8):
    """quantize_qk's outputs in shape (Gluon and its Triton kernel cannot run on a CPU): int8 Q and K as
    [B*H, S padded to 64 rows, D], one scale per 64 rows, and K's mean [B, H, D]."""
    padded = [-(-t.shape[2] // QUANT_BLOCK) * QUANT_BLOCK for t in (q, k)]
    buffers = [torch.zeros(t.shape[0] * t.shape[1], rows, t.shape[3], dtype=torch.int8)
               for t, rows in zip((q, k), padded)]
    scales = [torch.ones(t.shape[0] * t.shape[1], rows // QUANT_BLOCK) for t, rows in zip((q, k), padded)]
    return buffers[0], scales[0], buffers[1], scales[1], torch.zeros(q.shape[0], q.shape[1], q.shape[3])


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("case", ["no-out", "out-head-dim-strided", "q-head-dim-strided"])
def test_kernel_stores_only_into_rows_it_can_write(monkeypatch, int8, case):
    # The kernel stores rows of head_dim contiguous elements. Gluon cannot run on a CPU: stand in for the launch
    # (and for quantize_qk's Triton kernel) and check where the host side has it store, and what it returns.
    stored = []
    monkeypatch.setattr(hopper_module, "launch", lambda views, out, lse, **kwargs: stored.append(out.fill_(1.0)))
    monkeypatch.setattr(hopper_module, "_l2_bytes", lambda device_index: 50 * 2 ** 20)
    if int8:
        monkeypatch.setattr(hopper_module, "quantize_qk", _fake_quantize_qk)
    q = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16)
    if case == "q-head-dim-strided":
        q = torch.zeros(1, 64, 2, 100, dtype=torch.bfloat16).permute(0, 2, 3, 1)
    out = torch.zeros(1, 64, 2, 100, dtype=torch.bfloat16).permute(0, 2, 3, 1) if case == "out-head-dim-strided" \
        else None
    run = hopper_module.hopper_int8_attention if int8 else hopper_module.hopper_attention
    result, lse = run(q, q, q, 0.125, None, True, out)
    assert len(stored) == 1 and stored[0].stride(-1) == 1
    assert lse.shape == (1, 2, 100)
    if out is not None:
        assert result is out and bool((out == 1).all())  # copied into the caller's tensor
    else:
        assert result is stored[0]


@pytest.mark.parametrize("seq_kv,head_dim,dtype,persistent", [
    (512, 128, torch.bfloat16, True),      # Wan's text keys
    (4608, 128, torch.bfloat16, True),     # Flux 1024²
    (32760, 128, torch.bfloat16, True),    # Wan 480p: 16.8 MB of K and V per head, under a third of 50 MiB
    (49152, 128, torch.bfloat16, False),   # 25.2 MB: measured faster with one CTA per query tile
    (75600, 128, torch.bfloat16, False),   # Wan 720p
    (49152, 64, torch.bfloat16, True),     # half the bytes per key
])
def test_persistent_launch_while_one_heads_keys_and_values_fit_a_third_of_l2(monkeypatch, seq_kv, head_dim, dtype,
                                                                            persistent):
    monkeypatch.setattr(hopper_module, "_l2_bytes", lambda device_index: 50 * 2 ** 20)  # H100's L2
    k = torch.empty(1, 2, seq_kv, head_dim, dtype=dtype)
    assert hopper_module.persistent_pays(k, k) is persistent


@pytest.mark.parametrize("l2_bytes,expected", [(50 * 2 ** 20, True), (2 ** 20, False)])
def test_launch_follows_persistent_pays_unless_told(monkeypatch, l2_bytes, expected):
    # 2,000 keys of head_dim 64: 512 kB of bf16 K and V per head, persistent under a 50 MiB L2, not under a 1 MiB
    # one; an explicit persistent= wins over the rule, and int8 stays persistent (the rule was measured on bf16)
    launches = []
    monkeypatch.setattr(hopper_module, "launch", lambda views, out, lse, **kwargs: launches.append(kwargs))
    monkeypatch.setattr(hopper_module, "_l2_bytes", lambda device_index: l2_bytes)
    monkeypatch.setattr(hopper_module, "quantize_qk", _fake_quantize_qk)
    q = torch.zeros(1, 2, 2000, 64, dtype=torch.bfloat16)
    hopper_module.hopper_attention(q, q, q, 0.125, None, False)
    hopper_module.hopper_attention(q, q, q, 0.125, None, False, persistent=not expected)
    hopper_module.hopper_int8_attention(q, q, q, 0.125, None, False)
    assert [launch["persistent"] for launch in launches] == [expected, not expected, True]
