"""Calibration on CPU: one process (compute only) and two gloo ranks (links too) write JSON that loads."""

from seqshard.costmodel import Cluster
from seqshard.costmodel.calibrate import Sizes, calibrate, main

TINY = Sizes(matmul=32, attention=(16, 32), heads=1, head_dim=8, messages=(256, 4096),
             copy_bytes=1 << 16, repeats=1, warmup=0)


def test_one_process_measures_the_device_and_borrows_preset_links(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    cluster = calibrate(out, sizes=TINY)
    assert Cluster.load(out) == cluster
    assert cluster.gpus == 1 and cluster.gpu.name == "cpu"
    assert [p[0] for p in cluster.gpu.attention_causal] == [16, 32]
    assert cluster.levels[0][0].name == "nvlink-preset"
    assert "[calibrate] matmul" in capsys.readouterr().out


def test_main_quick(tmp_path):
    out = tmp_path / "sub" / "c.json"
    assert main(["--out", str(out), "--quick", "--links-from", "a100"]) == 0
    assert Cluster.load(out).levels[0][0].name == "nvlink3-preset"


def _calibrate_on_rank(path):
    return calibrate(path, sizes=TINY).to_json()


def test_two_ranks_measure_the_link(pool2, tmp_path):
    out = tmp_path / "two.json"
    texts = pool2.run(_calibrate_on_rank, str(out))
    assert texts[0] == texts[1]  # every rank returns the same cluster
    cluster = Cluster.load(out)
    assert cluster.gpus == 2
    link, count = cluster.levels[0]
    assert (link.name, count) == ("intra", 2)
    assert link.latency > 0 and [x for x, _ in link.all_to_all] == [256, 4096]
