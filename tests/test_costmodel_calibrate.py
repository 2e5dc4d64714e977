"""Calibration on CPU: one process (compute only) and two gloo ranks (links too) write JSON that loads."""

import functools
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqshard.capture import capture
from seqshard.costmodel import Cluster
from seqshard.costmodel import calibrate as calib
from seqshard.costmodel.calibrate import Sizes, calibrate, main
from seqshard.dims import analyze
from seqshard.planner.api import plan_captured
from seqshard.strategies import Costs, candidates
from seqshard.strategies.costs import fused_chains, fused_losses

TINY = Sizes(matmul=32, attention=(16, 32), heads=1, head_dim=8, messages=(256, 4096),
             copy_bytes=1 << 16, repeats=1, warmup=0)


def test_one_process_measures_the_device_and_borrows_preset_links(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    cluster = calibrate(out, sizes=TINY)
    assert Cluster.load(out) == cluster
    assert cluster.gpus == 1 and cluster.gpu.name == "cpu"
    assert [p[0] for p in cluster.gpu.attention_causal] == [16, 32]
    assert cluster.levels[0][0].name == "nvlink-preset"
    assert (cluster.gpu.fused_bandwidth_efficiency, cluster.gpu.fused_loss_efficiency) == (1, 1)
    log = capsys.readouterr().out
    assert "[calibrate] matmul" in log and "compiled program: not measured" in log


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


# ------------------------------------------------------------------ the compiled program
# Big sizes on the meta device: every chain's first op is over the one-kernel floor (KERNEL_S),
# so the cost model's chain time is `chains_time` exactly.
CT, CD, CF, CV = 32768, 2048, 8192, 4096


class _Chains(nn.Module):
    """The calibration's two chains, as a layer (`layers.0`: compile="layers" fuses inside one)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(CD))

    def forward(self, x, r, g, u):
        h, y = calib._norm_chain(x, r, self.weight)
        return h, y, calib._swiglu_chain(g, u)


class _Model(nn.Module):
    """The chains' layer, and an LM head + cross-entropy on its y (the fused loss kernel's)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Chains()])
        self.lm_head = nn.Linear(CD, CV, bias=False)

    def forward(self, x, r, g, u, labels):
        h, y, p = self.layers[0](x, r, g, u)
        return F.cross_entropy(self.lm_head(y).float(), labels), h, p


@functools.cache
def _dims():
    with torch.device("meta"):
        model = _Model().to(torch.bfloat16)
    args = [torch.zeros(CT, n, dtype=torch.bfloat16, device="meta") for n in (CD, CD, CF, CF)]
    return analyze(capture(model, (*args, torch.zeros(CT, dtype=torch.long, device="meta"))))


def _costs(gpu, **kw):
    dims = _dims()
    cluster = replace(Cluster.preset("h200", gpus=1), gpu=gpu)
    costs = Costs(dims, cluster, (("sp", 1),), **kw)

    def seconds(nodes):
        return sum(costs.node(n, candidates(dims, n, costs.mesh)[0], saved=False).compute_s
                   for n in nodes)
    return dims, seconds


def test_calibration_formulas_are_the_cost_models():
    """`chain_work`/`chains_time` and `fused_loss_time` (what calibrate measures against) give
    what `strategies.costs` prices for the same ops, at the defaults and at measured values
    (so a measured field moves the prediction the way it was measured)."""
    preset = Cluster.preset("h200", gpus=1).gpu
    works = calib.chain_work(CT, CD, CF, 2)
    for eff in (1.0, 0.8):
        gpu = replace(preset, fused_bandwidth_efficiency=eff, fused_loss_efficiency=eff)
        dims, seconds = _costs(gpu, compiled=True, fused_loss=True)
        chains, losses = fused_chains(dims), fused_losses(dims)
        assert len({c for c, *_ in chains.values()}) == 2
        assert seconds(chains) == pytest.approx(calib.chains_time(works, gpu), rel=1e-12)
        loss = calib.fused_loss_time(CT, CD, CV, 2, gpu)
        assert seconds(losses) == pytest.approx(loss, rel=1e-12)
    assert calib.chains_time(works, gpu) == pytest.approx(calib.chains_time(works, preset) / 0.8)
    # the bytes counted: add reads x, r, writes h; norm writes y; silu·mul reads g, u, writes p
    assert sum(w.bytes for w in works) == (4 * CT * CD + CD + 3 * CT * CF) * 2


def test_calibrate_measures_the_compiled_program(tmp_path, capsys):
    """--fused on CPU (the chains through aot_eager: the path, not Inductor's kernels): both fields
    land in the JSON and, on an H200 preset, change a compiled plan's predicted step the way they
    were measured; an older file without them loads at the defaults; a backend that fails keeps
    the default."""
    from seqshard.codegen.kernels.linear_ce import linear_cross_entropy
    out = tmp_path / "fused.json"
    cluster = calibrate(out, sizes=TINY, fused=True, fused_loss=linear_cross_entropy,
                        compile_backend="aot_eager")
    gpu = Cluster.load(out).gpu
    assert gpu == cluster.gpu
    assert gpu.fused_bandwidth_efficiency != 1.0 and gpu.fused_loss_efficiency != 1.0
    log = capsys.readouterr().out
    assert "| fused chains fwd+bwd" in log and "| fused LM-head loss fwd+bwd" in log
    assert "| fused LM-head loss fwd+bwd" in (tmp_path / "fused.md").read_text()

    data = json.loads(out.read_text())
    for key in ("fused_bandwidth_efficiency", "fused_loss_efficiency"):
        del data["gpu"][key]
    old = Cluster.from_json(json.dumps(data)).gpu
    assert (old.fused_bandwidth_efficiency, old.fused_loss_efficiency) == (1.0, 1.0)

    dims = _dims()
    h200 = Cluster.preset("h200", gpus=1)  # CPU rates can make the chains compute bound

    def step(**fields):
        c = replace(h200, gpu=replace(h200.gpu, **fields))
        return plan_captured(dims, cluster=c, memory_budget=1e15, compile="layers",
                             kernels=True).predicted.step_s

    defaults = step(fused_bandwidth_efficiency=1.0, fused_loss_efficiency=1.0)
    for key in ("fused_bandwidth_efficiency", "fused_loss_efficiency"):
        measured = step(**{key: getattr(gpu, key)} | {k: 1.0 for k in
                                                        ("fused_bandwidth_efficiency",
                                                         "fused_loss_efficiency") if k != key})
        assert measured != defaults and (measured > defaults) == (getattr(gpu, key) < 1), \
            (key, getattr(gpu, key), measured, defaults)

    failed = calibrate(tmp_path / "none.json", sizes=TINY, fused=True, compile_backend="no-such")
    assert (failed.gpu.fused_bandwidth_efficiency, failed.gpu.fused_loss_efficiency) == (1.0, 1.0)
    log = capsys.readouterr().out
    assert "fused chains: not measured" in log and "fused loss: not measured" in log
