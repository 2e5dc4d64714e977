"""Cluster specs: presets, parsing, validation, JSON, and the mapping of mesh axes onto links."""

import json

import pytest
import sympy

from seqshard.costmodel import GPU, Cluster, Link
from seqshard.costmodel.cluster import PRESETS

MiB = 2**20


def test_h200_preset_carries_the_anchor_measurements():
    """A failure here means the H200 table no longer matches docs/anchors.md."""
    c = Cluster.preset("h200", gpus=4)
    assert (c.gpus, c.gpus_per_node, c.nodes) == (4, 4, 1)
    assert c.gpu.matmul_bf16 == 758e12
    assert c.gpu.hbm_bandwidth == 4.15e12
    assert c.gpu.attention_rate(8192, causal=True) == 517e12
    assert c.gpu.attention_rate(131072, causal=True) == 535e12
    assert c.gpu.attention_rate(32768, causal=False) == 559e12
    nvlink = c.levels[0][0]
    assert nvlink.bus_bandwidth("all_to_all", 256 * MiB) == 272e9
    assert nvlink.bus_bandwidth("all_to_all", 16 * MiB) == 119e9
    assert nvlink.bus_bandwidth("send_recv", 16 * MiB) == 84e9
    assert nvlink.bus_bandwidth("all_reduce", 256 * MiB) == 318e9


def test_attention_priced_per_kernel_cudnn_by_default_fa4_on_request():
    """H200 carries FlashAttention-4's rates beside cuDNN's (docs/anchors.md "One H200"); a plan
    prices the GPU's `attention_backend`; the choice survives JSON."""
    c = Cluster.preset("h200", gpus=4)
    assert c.gpu.attention_backend == "cudnn" and [k[0] for k in c.gpu.attention_kernels] == ["fa4"]
    fa4 = c.with_attention_backend("fa4")
    assert fa4.gpu.attention_backend == "fa4" and fa4.gpu.attention_rate(32768, causal=True) == 614e12
    assert fa4.gpu.attention_rate(131072, causal=True) == 612e12
    assert [k[0] for k in fa4.gpu.attention_kernels] == ["cudnn"]
    assert fa4.with_attention_backend("cudnn") == c and Cluster.from_json(fa4.to_json()) == fa4
    with pytest.raises(ValueError, match=r"no attention rates for 'flash'; it has \['cudnn', 'fa4'\]"):
        c.with_attention_backend("flash")
    with pytest.raises(ValueError, match="distinct"):
        GPU(**{**_fields(c.gpu), "attention_backend": "fa4"})
    assert Cluster.preset("a100").gpu.attention_kernels == ()  # FA4's backward needs sm90+


def test_rate_tables_interpolate_in_log_length_and_stay_flat_outside():
    gpu = PRESETS["h200"][0]
    # 16K is halfway between 8K and 32K in log length
    assert gpu.attention_rate(16384, causal=True) == pytest.approx((517e12 + 544e12) / 2)
    assert gpu.attention_rate(1024, causal=True) == 517e12
    assert gpu.attention_rate(1 << 22, causal=True) == 535e12


def test_table_lookup_is_a_sympy_function_of_a_symbol():
    gpu = PRESETS["h100"][0]
    s = sympy.Symbol("s", positive=True)
    rate = gpu.attention_rate(s / 4, causal=True)
    assert isinstance(rate, sympy.Function) and rate.func.__name__ == "attn_rate_causal_H100"
    assert float(rate.subs(s, 4 * 16384)) == pytest.approx(gpu.attention_rate(16384, causal=True))
    f = sympy.lambdify(s, rate)
    assert f(4 * 16384) == pytest.approx(gpu.attention_rate(16384, causal=True))


@pytest.mark.parametrize("text, gpus, per_node, names", [
    ("h100x1024", 1024, 8, ["nvlink", "ib-ndr"]),
    ("h200x4", 4, 4, ["nvlink"]),
    ("A100x16", 16, 8, ["nvlink3", "ib-hdr"]),
    ("h200x8", 8, 8, ["nvlink"]),
])
def test_parse(text, gpus, per_node, names):
    c = Cluster.parse(text)
    assert c.gpus == gpus and c.gpus_per_node == per_node
    assert [link.name for link, _ in c.levels] == names
    assert c.gpu.name == text[:4].upper()


@pytest.mark.parametrize("text, match", [
    ("h100", "KINDxGPUS"),
    ("v100x8", "no cluster preset"),
    ("h100x12", "multiple of 8"),
    ("h200x0", "positive"),
])
def test_parse_rejects_with_a_hint(text, match):
    with pytest.raises(ValueError, match=match):
        Cluster.parse(text)


def test_h100_and_a100_scale_from_datasheets():
    h100, a100, h200 = PRESETS["h100"][0], PRESETS["a100"][0], PRESETS["h200"][0]
    assert h100.matmul_bf16 == pytest.approx(h200.matmul_bf16)      # same tensor cores
    assert h100.hbm_bandwidth == pytest.approx(4.15e12 * 3.35 / 4.8)
    assert a100.matmul_bf16 == pytest.approx(758e12 * 312 / 989)
    assert PRESETS["a100"][1].bus_bandwidth("all_gather", 256 * MiB) == pytest.approx(317e9 * 300 / 450)


def test_validation_names_what_to_change():
    gpu = PRESETS["h200"][0]
    nvlink = PRESETS["h200"][1]
    with pytest.raises(ValueError, match="matmul_bf16 must be a positive"):
        GPU(**{**_fields(gpu), "matmul_bf16": -1.0})
    with pytest.raises(ValueError, match="strictly increasing"):
        GPU(**{**_fields(gpu), "attention_causal": ((8192, 1e12), (4096, 1e12))})
    with pytest.raises(ValueError, match="overlap_slowdown must lie in"):
        GPU(**{**_fields(gpu), "overlap_slowdown": 1.5})
    with pytest.raises(ValueError, match="latency"):
        Link(**{**_fields(nvlink), "latency": 0})
    with pytest.raises(ValueError, match="multiply to"):
        Cluster(gpu=gpu, gpus=16, levels=((nvlink, 8),))


def _fields(obj):
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


def test_json_round_trip(tmp_path):
    for c in (Cluster.parse("h100x1024"), Cluster.preset("a100", gpus=4)):
        text = c.to_json()
        assert json.loads(text)["gpus"] == c.gpus  # plain JSON, no pickle
        assert Cluster.from_json(text) == c
        c.save(tmp_path / "c.json")
        assert Cluster.load(tmp_path / "c.json") == c
        assert Cluster.parse(str(tmp_path / "c.json")) == c
    with pytest.raises(ValueError, match="not a seqshard cluster"):
        Cluster.from_json('{"gpus": 4}')
    with pytest.raises(ValueError, match="malformed cluster JSON"):
        Cluster.from_json(text.replace('"hbm_capacity"', '"hbm_size"'))


def test_specs_print_short():
    c = Cluster.parse("h100x1024")
    assert str(c) == "1024 × H100 = 8 over nvlink × 128 over ib-ndr"
    assert str(c.gpu).startswith("H100 (758 TFLOP/s bf16")
    assert "µs/step" in str(c.levels[0][0])


def test_axis_inside_a_node_is_nvlink_and_across_nodes_is_infiniband():
    c = Cluster.preset("h200", gpus=128)
    nvlink, ib = c.levels[0][0], c.levels[1][0]
    assert c.axis_link((16, 8), 1) is nvlink          # ranks i·8 + j, j < 8: one node
    assert c.axis_link((16, 8), 0) is ib              # one GPU in each of 16 nodes
    assert c.axis_link((32, 4), 1) is nvlink          # 4 neighbours: still one node
    assert c.axis_link((16, 8), -1) is nvlink
    assert c.axis_group_size((16, 8), 0) == 16


def test_axis_spanning_several_gpus_per_node_and_several_nodes_combines_both():
    c = Cluster.preset("h200", gpus=128)
    nvlink, ib = c.levels[0][0], c.levels[1][0]
    size = 256 * MiB
    ib_bw = ib.bus_bandwidth("all_gather", size)
    # (8, 16), axis 1: 16 ranks, 8 per node on 2 nodes
    both = c.axis_link((8, 16), 1)
    assert both.name == "nvlink+ib-ndr"
    assert both.latency == ib.latency
    # rings: every one of the 8 GPUs of a node has its own NIC, NVLink is the tighter
    assert both.bus_bandwidth("all_gather", size) == pytest.approx(min(317e9, 8 * ib_bw))
    # all-to-all: 8 of the 15 peers are behind the NIC
    assert both.bus_bandwidth("all_to_all", size) == pytest.approx(15 / 8 * ib_bw)
    # a ring step is as slow as its inter-node hop
    assert both.bus_bandwidth("send_recv", size) == pytest.approx(ib_bw)
    # the whole cluster: all-to-all is bound by the NICs, barely above one NIC
    world = c.axis_link((128,), 0)
    assert world.bus_bandwidth("all_to_all", size) == pytest.approx(127 / 120 * ib_bw)
    assert world.bus_bandwidth("all_to_all", size) < nvlink.bus_bandwidth("all_to_all", size) / 5


def test_axis_mapping_rejects_a_mesh_of_the_wrong_size():
    c = Cluster.preset("h200", gpus=8)
    with pytest.raises(ValueError, match="multiply to 8"):
        c.axis_link((4, 4), 0)
    with pytest.raises(ValueError, match="out of range"):
        c.axis_link((8,), 1)
