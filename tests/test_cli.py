"""The command line: each command runs and prints what its help says (a failure here is a
broken entry point or an argument that drifted from the code)."""

import re

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


# ------------------------------------------------------------------ mistakes: one line, exit 2
@pytest.mark.parametrize("argv,want", [
    (["plan", "--seq", "12Q"], "argument --seq: expected a positive count such as 4096, 128K or 1M, got '12Q'"),
    (["capture", "llama", "--seq", "0"], "argument --seq: expected a positive count"),
    (["plan", "--cluster", "tpux8"], "no cluster preset 'tpu'; use one of ['a100', 'h100', 'h200']"),
    (["plan", "--cluster", "h200"], "cannot read cluster 'h200'; write KINDxGPUS such as 'h200x8'"),
    (["plan", "--cluster", "/no/such/cluster.json"], "--cluster /no/such/cluster.json: no such file"),
    (["plan", "--model", "gpt"], "argument --model: invalid choice: 'gpt'"),
    (["plan", "--config", "llama9"], "unknown llama config 'llama9'; choose one of"),
    (["capture", "video_dit", "--config", "nope"], "unknown video_dit config 'nope'; choose one of"),
    (["plan", "--mesh", "sp8"], "--mesh sp8: expected AXIS=SIZE pairs separated by commas"),
])
def test_mistakes_are_one_line_errors(capsys, argv, want):
    """Old: raw tracebacks (ValueError from float('12Q'), from the cluster and model tables)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("seqshard: error: ") and want in err, err


@pytest.mark.parametrize("content,want", [
    ('{"format": 1}', "not a seqshard cluster file (format 1"),
    ("[1, 2]", "not a seqshard cluster file: 'list' object"),
    ("{", "not a seqshard cluster file: Expecting property name"),
])
def test_bad_cluster_files_are_one_line_errors(capsys, tmp_path, content, want):
    path = tmp_path / "cluster.json"
    path.write_text(content)
    assert main(["plan", "--config", "tiny", "--cluster", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--cluster {path}: {want}" in err, err


def test_capture_refuses_a_model_bigger_than_memory(capsys, monkeypatch):
    """Old: `seqshard capture llama --config llama3-70b` allocated 263 GiB of float32 parameters
    on the CPU and was killed. The parameters are counted on the meta device first."""
    import seqshard.cli as cli

    assert cli._available_memory() > 0
    monkeypatch.setattr(cli, "_available_memory", lambda: 100_000)  # tiny needs 175 KiB
    assert main(["capture", "llama", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"has [\d,]+ parameters, 1\d\d\.\d KiB in float32", err) \
        and "97.7 KiB available" in err and "add --meta" in err, err
    assert main(["capture", "llama", "--config", "tiny", "--meta"]) == 0
