"""bench.report's tables from hand-made result files: which backend triton is set against, the
marks a cell carries, and the lines that say how and from what a file was measured."""
from bench import measure, report

PROVENANCE = {"device": {"name": "NVIDIA H100 80GB HBM3"}, "date": "2026-01-02T03:04:05+00:00", "torch": "2.9.0",
              "triton": "3.5.0", "cuda": "12.8", "git_sha": "0123456789abcdef"}


def op_result(*backends: tuple[str, float, bool]) -> dict:
    """A per-op file of one case, a row per (backend, rate, verified)."""
    rows = [dict(op="rms_norm", shape="16384 x 768", backend=b, value=value, ms=1.0, host_ms=None, roofline=0.25,
                 verified=verified, peak_mib=None, error=None, unit="GB/s", **{"pass": "fwd"})
            for b, value, verified in backends]
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
