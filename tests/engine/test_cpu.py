"""--dtype auto on CPU (cpu.py): the CPU's features read from /proc/cpuinfo's text, the choice between bf16 and fp32
from their timings, and the choice kept per CPU, on feature sets and timings simulated here; and one real
measurement of this machine."""

import logging

from server.engine.cpu import BF16_MORE, PLAIN, Cpu, choose, cpu_dtype, measure, native_bf16, read_cpu

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""


def test_features_are_read_from_cpuinfo():
    assert read_cpu(AVX2_EPYC) == Cpu("AMD EPYC 7B13", ("AVX2",))
    assert read_cpu(SAPPHIRE_RAPIDS).features == ("AVX2", "AVX-512", "AVX512-BF16", "AVX512-VNNI", "AVX-VNNI",
                                                  "AMX-BF16", "AMX-INT8")
    assert read_cpu("processor\t: 0\nBogoMIPS\t: 50.00\n").features == ()  # an ARM machine: no x86 flags
    assert read_cpu(AVX2_EPYC).key != read_cpu(SAPPHIRE_RAPIDS).key


def test_bf16_is_chosen_only_where_it_is_faster_by_the_margin():
    native = choose({"float32": [7.2, 21.1], "bfloat16": [3.5, 7.3]})  # this project's AVX-512 EPYC
    assert native.dtype == "bfloat16" and "0.41x" in native.why and native.onednn_min_tokens == 0
    # where oneDNN computes bf16, torch's own kernel may read the weights faster at one row: then one-token
    # forwards switch oneDNN off; not where it is within the margin, nor where fp32 is chosen
    assert choose({"float32": [7.2, 21.1], "bfloat16": [5.2, 7.3], "bfloat16 without oneDNN": [3.2]}).onednn_min_tokens == 2
    assert choose({"float32": [7.2, 21.1], "bfloat16": [5.2, 7.3], "bfloat16 without oneDNN": [5.0]}).onednn_min_tokens == 0
    assert choose({"float32": [5.0, 20.0], "bfloat16": [9.0, 80.0], "bfloat16 without oneDNN": [1.0]}).onednn_min_tokens == 0
    # bf16 converted to fp32 (AVX2): far faster at one row (half the bytes), slower at 32 (the conversions)
    assert choose({"float32": [12.7, 40.0], "bfloat16": [6.0, 60.0]}).dtype == "bfloat16"  # 0.84x
    assert choose({"float32": [12.7, 40.0], "bfloat16": [7.0, 60.0]}).dtype == "float32"  # 0.91x: not enough
    assert choose({"float32": [5.0, 20.0], "bfloat16": [9.0, 80.0]}).dtype == "float32"  # slower at both


def test_4_bit_weights_are_chosen_where_they_beat_bf16_over_1_and_8_rows_and_keep_bf16_beside_them_where_it_wins():
    # bf16 at its best: 3.2 ms at one row (without oneDNN), 4.0 at 8, 7.3 at 32, 20.0 at 128
    ms = {"float32": [7.2, 21.1], "bfloat16": [5.2, 7.3], "bfloat16 at 8 and 128 rows": [4.0, 20.0],
          "bfloat16 without oneDNN": [3.2]}
    both = choose({**ms, "int4": [1.5, 3.8, 12.0, 60.0]})  # this project's AVX-512 EPYC: bf16 ahead at 32 rows
    # 4-bit held at 8 rows and lost at 32: bf16 from halfway between, on a log scale
    assert both.int4 and both.int4_dense_from == 16 and "bf16 weights beside them from 16 rows" in both.why
    assert both.dtype == "bfloat16" and both.onednn_min_tokens == 2
    assert choose({**ms, "int4": [1.5, 5.0, 12.0, 60.0]}).int4_dense_from == 3
    assert choose({**ms, "int4": [1.5, 3.0, 7.5, 60.0]}).int4_dense_from == 64  # prompt chunks only
    assert choose({**ms, "int4": [1.5, 3.0, 7.5, 21.0]}).int4_dense_from == 0  # within the margin everywhere
    assert not choose({**ms, "int4": [3.0, 3.7, 7.0, 20.0]}).int4  # 0.94x and 0.93x over 1 and 8 rows: not enough
    assert choose({**ms, "int4": [3.0, 3.0, 7.0, 20.0]}).int4  # 0.94x at one row, 0.75x at 8: 0.84x over both
    # bf16 converted to fp32 (oneDNN and torch capped at AVX2 on the EPYC, as measured): a little slower at one row,
    # 2.6x faster at 8 rows, 2.3x at 32: taken, and packed at every row count
    avx2 = choose({"float32": [7.8, 20.4], "bfloat16": [1.8, 47.5], "bfloat16 at 8 and 128 rows": [13.3, 190.2],
                   "int4": [2.1, 5.1, 20.5, 80.0]})
    assert avx2.int4 and avx2.int4_dense_from == 0 and avx2.dtype == "bfloat16"
    assert not choose(ms).int4  # no kernel: never
    fp32 = {"float32": [5.0, 20.0], "bfloat16": [9.0, 80.0], "bfloat16 at 8 and 128 rows": [30.0, 200.0],
            "int4": [1.0, 2.0, 5.0, 20.0]}
    # where fp32 was chosen, 4-bit weights run against fp32's times (1 and 32 rows), with no bf16 copies beside them
    assert choose(fp32).int4 and choose(fp32).int4_dense_from == 0 and choose(fp32).dtype == "float32"
    assert not choose({**fp32, "int4": [5.0, 9.0, 19.0, 80.0]}).int4  # 0.97x over 1 and 32 rows: not enough


def test_the_choice_is_measured_once_per_cpu_and_kept(tmp_path, caplog):
    calls = []

    def fake(timings):
        def measure():
            calls.append(timings)
            return timings
        return measure

    cache = tmp_path / "cpu-dtype.json"
    avx2, spr = read_cpu(AVX2_EPYC), read_cpu(SAPPHIRE_RAPIDS)
    with caplog.at_level(logging.INFO, logger="server.engine.cpu"):
        assert cpu_dtype(cache, avx2, fake({"float32": [12.7, 40.0], "bfloat16": [10.0, 60.0]})).dtype == "float32"
        assert "AMD EPYC 7B13; AVX2;" in caplog.text and "1.09x" in caplog.text and "measured in" in caplog.text
        assert cpu_dtype(cache, avx2, fake({"float32": [9.0, 9.0], "bfloat16": [1.0, 1.0]})).dtype == "float32"
        assert len(calls) == 1 and "kept in" in caplog.text  # read back, not measured again
        kept = cpu_dtype(cache, spr, fake({"float32": [7.0, 20.0], "bfloat16": [3.0, 6.0],
                                           "bfloat16 without oneDNN": [1.9]}))
        assert (kept.dtype, kept.onednn_min_tokens) == ("bfloat16", 2)
    assert len(calls) == 2 and avx2.key in cache.read_text() and spr.key in cache.read_text()


def test_a_cache_folder_that_cannot_be_written_only_costs_a_measurement(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache folder's place is taken by a file: nothing can be written under it
    with caplog.at_level(logging.INFO, logger="server.engine.cpu"):
        choice = cpu_dtype(blocked / "cpu-dtype.json", read_cpu(AVX2_EPYC),
                           lambda: {"float32": [12.7, 40.0], "bfloat16": [6.0, 60.0]})
    assert choice.dtype == "bfloat16" and "not kept" in caplog.text


def test_this_machine_is_measured():
    ms = measure(repeats=1)
    print(f"this CPU: {read_cpu()}, {ms}: {choose(ms).why}")
    assert set(ms) == {"float32", "bfloat16", BF16_MORE, "int4"} | ({PLAIN} if native_bf16() else set())
    assert all(t > 0 for times in ms.values() for t in times)
