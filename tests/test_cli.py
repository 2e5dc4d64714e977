"""The command line: each command runs and prints what its help says (a failure here is a
broken entry point or an argument that drifted from the code)."""

import pytest

from seqshard.cli import _count, main


def test_counts():
    assert (_count("1M"), _count("128K"), _count("4096"), _count("1.5K")) == (1 << 20, 1 << 17, 4096, 1536)


def test_capture_prints_factor_signatures(capsys):
    assert main(["capture", "llama", "--seq", "19"]) == 0
    out = capsys.readouterr().out
    assert "((b,), (h,), (s,), (e,))" in out and "llama.py" in out and "factors:" in out


def test_plan_prints_a_plan(capsys, tmp_path):
    path = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama", "--config", "tiny", "--seq", "64K", "--cluster",
                 "h200x4", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seqshard plan" in out and "← chosen" in out and path.exists()


def test_plan_reports_infeasible(capsys):
    assert main(["plan", "--model", "llama", "--config", "llama3-8b", "--seq", "1M", "--cluster",
                 "h200x8", "--state", "replicated"]) == 2
    assert "least memory any plan needs" in capsys.readouterr().out


def test_bench_names_the_scripts():
    with pytest.raises(SystemExit, match="plan_time"):
        main(["bench", "no_such_bench"])


def test_calibrate_takes_its_own_options(tmp_path):
    """`seqshard calibrate --out FILE --quick` reaches the calibration (on CPU: small sizes)."""
    from seqshard.costmodel import Cluster

    out = tmp_path / "cal.json"
    assert main(["calibrate", "--out", str(out), "--quick"]) == 0
    assert Cluster.load(out).gpu.attention_head_dim[-1][1] == 1.0
