"""bench.report's tables from hand-made result files: which backend triton is set against, the
marks a cell carries, and the lines that say how and from what a file was measured."""
from bench import breakdown, measure, report

PROVENANCE = {"device": {"name": "NVIDIA H100 80GB HBM3"}, "date": "2026-01-02T03:04:05+00:00", "torch": "2.9.0",
              "triton": "3.5.0", "cuda": "12.8", "git_sha": "0123456789abcdef"}


def op_result(*backends: tuple) -> dict:
    """A per-op file of one case, a row per (backend, rate, verified[, error])."""
    rows = [dict(op="rms_norm", shape="16384 x 768", backend=b, value=value, ms=1.0, host_ms=None, roofline=0.25,
                 verified=verified, peak_mib=None, error=(error or [None])[0], unit="GB/s", **{"pass": "fwd"})
            for b, value, verified, *error in backends]
    return {"title": "rms_norm", "roofline": {"unit": "GB/s", "name": "copy", "value": 1000.0}, "rows": rows}


def test_triton_is_set_against_the_fastest_other_backend():
    table = report.op_table(op_result(("torch", 100.0, True), ("compile", 200.0, True), ("triton", 300.0, True)))
    assert "| 16384 x 768 | fwd | 100 | 200 | 300 | 25% | 1.50x |" in table  # 300 / 200, not / 100


def test_an_unverified_backend_is_no_fastest_other():
    """A backend that failed its check may be fast by computing the wrong thing: triton is set against
    the fastest one that passed."""
    table = report.op_table(op_result(("torch", 100.0, True), ("compile", 600.0, False), ("triton", 300.0, True)))
    assert "| 16384 x 768 | fwd | 100 | 600 unverified | 300 | 25% | 3.00x |" in table


def test_the_provenance_line_says_uncommitted_changes_only_when_there_were():
    assert report.provenance_line(dict(PROVENANCE, git_dirty=True)).endswith("git 0123456789 (uncommitted changes)")
    assert report.provenance_line(dict(PROVENANCE, git_dirty=False)).endswith("git 0123456789")
    assert report.provenance_line(PROVENANCE).endswith("git 0123456789")  # files from before git_dirty


def profile(chosen: dict, compile_verified: bool = True) -> dict:
    """A kernel profile's workload of one op, timed by its torch, compile and triton backends."""
    def ran(ms: float, verified: bool = True) -> dict:
        return {"ms": {"fwd+bwd": ms}, "verified": verified}
    return {**PROVENANCE, "workload": {"preset": "gpt2", "shapes": "gpt2 shapes", "dtype": "bfloat16"},
            "rooflines": {"copy_gbs": 3000.0, "matmul_tflops": 700.0},
            "ops": {"swiglu": {"training_pass": "fwd+bwd", "shape": "16384 x 3072", "unit": "GB/s", "chosen": chosen,
                               "backends": {"torch": ran(3.0), "compile": ran(1.0, compile_verified),
                                            "triton": {**ran(2.0), "rate": {"fwd+bwd": 1500.0},
                                                       "roofline": {"fwd+bwd": 0.5}}}}}}


def test_a_profile_marks_a_backend_that_failed_its_check():
    table = report.profile_table(profile({"eager": "triton", "compiled": "triton"}, compile_verified=False))
    assert "| swiglu | 16384 x 3072 | fwd+bwd | 3.000 | 1.000 unverified | 2.000 | 1,500 GB/s (50%) |" in table


def test_a_profile_shows_the_eager_and_the_compiled_choice_each_in_its_column():
    table = report.profile_table(profile({"eager": "triton", "compiled": None}))
    header, _, line = table.splitlines()[-3:]
    assert header.endswith("| chosen eager | chosen compiled |")
    assert line.endswith("| triton | none |")


def test_only_files_that_do_not_say_how_they_were_timed_get_the_do_bench_caveat():
    old = op_result(("triton", 300.0, True))
    assert "triton.testing.do_bench" in report.timing(old)
    assert report.timing(dict(old, timing=measure.TIMING)) == ""


def test_the_provenance_line_in_full():
    assert report.provenance_line(PROVENANCE) == (
        "NVIDIA H100 80GB HBM3, 2026-01-02, torch 2.9.0, triton 3.5.0, CUDA 12.8, git 0123456789")


def mfu_result(**row) -> dict:
    """A bench.mfu file of one measured row, on an H100 SXM's 989.4 TFLOPS."""
    return {**PROVENANCE, "preset": "gpt2", "batch_size": 16, "seq_len": 1024, "dtype": "bfloat16",
            "optimizer": "adamw", "steps": 30, "warmup": 8, "convention": "PaLM",
            "peak": {"tflops": 989.4, "source": "H100 SXM"},
            "rows": [dict(variant="triton", tokens_per_s=512_345.6, ms_median=31.98, host_ms=1.34, tflops=438.2,
                          mfu=0.44289, hw_tflops=413.7, peak_memory_gib=30.04) | row]}


def test_an_mfu_row_shows_each_figure_in_its_column():
    """Every column of a measured row, and the peak the title divides by."""
    table = report.mfu_table(mfu_result())
    assert "| triton | 512,346 | 32.0 | 1.3 | 438 | 44.3% | 414 | 30.0 |" in table
    assert "MFU against 989.4 TFLOPS (PaLM)" in table


def test_an_error_row_has_every_column():
    table = report.mfu_table(mfu_result() | {"rows": [{"variant": "triton", "error": "OutOfMemoryError: boom"}]})
    header, rule, row = table.split("\n\n")[1].splitlines()
    assert row.count(" | ") == header.count(" | ") == rule.count(" | ")


def test_a_profiles_title_gives_its_rooflines():
    workload = {**PROVENANCE, "workload": {"preset": "gpt2", "shapes": "gpt2 shapes", "dtype": "bfloat16"},
                "rooflines": {"copy_gbs": 3000.0, "matmul_tflops": 700.0}, "ops": {}}
    assert report.profile_table(workload).startswith(
        "bench.kernels gpt2: gpt2 shapes; rooflines measured: copy 3,000 GB/s, bfloat16 matmul 700 TFLOPS")


def test_no_ratio_against_a_backend_that_measured_zero():
    """A rate rounded to nothing leaves the ratio blank, not the file without its table."""
    table = report.op_table(op_result(("torch", 0.0, True), ("triton", 300.0, True)))
    assert "| 16384 x 768 | fwd | 0 | 300 | 25% |  |" in table


def test_a_triton_backend_that_failed_to_run_is_set_against_nothing():
    table = report.op_table(op_result(("torch", 100.0, True), ("triton", None, None, "OutOfMemoryError: boom")))
    assert "| 16384 x 768 | fwd | 100 | error: OutOfMemoryError: boom |  |  |" in table


def test_only_breakdowns_without_their_kernels_say_their_kinds_are_as_then_sorted():
    old = dict(steps=3, busy=0.5, ms=breakdown.kinds_of({}), matmul_tflops=None, attention_tflops=None)
    note = "kinds as bench/breakdown.py sorted them when measured"
    assert note in report.breakdown_table(mfu_result(breakdown=old))
    assert note not in report.breakdown_table(mfu_result(breakdown=dict(old, kernels={})))


def test_a_file_cut_short_is_reported_as_not_read(tmp_path):
    """(Written while it is read: the other files' tables still come.)"""
    path = tmp_path / "mfu.json"
    path.write_text('{"preset": "gpt2", "rows": [')
    text = report.report(path)
    assert text.startswith("mfu.json: not read (") and "cut short" in text
