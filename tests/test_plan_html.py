"""The plan page (`Plan.to_html`, `seqshard plan --html`): what it contains, that no text from the
plan escapes into markup, that an 80-layer plan folds, and that headless Chromium draws it.

Chromium is Debian's `chromium` package; `scripts/setup.sh --dev` installs it (CI runs that). Where
it is missing the screenshot test skips and says so; the structural tests run everywhere.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest

from seqshard import planner
from seqshard.models import AXES, build
from seqshard.strategies import Cost, NodePlan, Plan, Predicted, Split

# every element the renderer writes; a tag outside this set came from unescaped plan text
TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "div", "span", "p",
        "ul", "li", "table", "tr", "th", "td", "svg", "rect", "pre"}


@pytest.fixture(scope="module")
def plan() -> Plan:
    """Tiny Llama at 8192 tokens on 4 H200s: the sequence splits and attention is distributed,
    so the page has layouts, an algorithm, exposed communication and alternatives."""
    model, inputs = build("llama", "tiny", device="meta", seq=8192)
    return planner.plan(model, inputs, cluster="h200x4", axes=AXES["llama"])


def _tags(page: str) -> set[str]:
    tags = set()

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.add(tag)

    Collect().feed(page)
    return tags


def test_page_shows_every_layer_algorithm_and_alternative(plan):
    page = plan.to_html()
    for layer, layouts, algos, *_ in plan.rows():
        assert f">{layer}<" in page, f"layer row {layer!r} missing from the strategy map"
        for layout in layouts.split(", "):
            assert f">{layout}</span>" in page, f"layout chip {layout!r} missing"
    for n in plan.attention():
        assert f">{n.algorithm}</span>" in page, f"algorithm chip {n.algorithm!r} missing"
    # both layers share one attention explanation: it is shown once, its chosen line highlighted
    attention = {k: t for k, t in plan.explanations.items() if plan.node(k).algorithm}
    texts = set(attention.values())
    assert len(texts) == 1 and len(attention) == 2
    first_line = next(iter(texts)).splitlines()[0]
    assert page.count(first_line) == 1, "each distinct explanation should appear exactly once"
    assert "and 1 more alike" in page and "class=\"chosen\"" in page
    p = plan.predicted
    assert p.comm_s > 0 and "exposed comm" in page
    # self-contained: no scripts, no links, nothing fetched
    assert _tags(page) <= TAGS, f"unexpected elements {_tags(page) - TAGS}"
    for needle in ("<script", "http://", "https://", "src=", "href=", "url("):
        assert needle not in page, f"the page should be self-contained, found {needle!r}"


def test_text_from_the_plan_is_escaped(plan):
    """A module name, note or explanation holding markup must show as text, never as markup."""
    evil = "<img src=x onerror=alert(1)>&amp;"
    nodes = (replace(plan.nodes[0], module=f"layers.0.{evil}"),) + plan.nodes[1:]
    key = next(iter(plan.explanations))
    bad = replace(plan, nodes=nodes, notes=(f"<script>alert(1)</script> {evil}",),
                  explanations={key: f"<b>{evil}</b> ← chosen"})
    page = bad.to_html()
    assert _tags(page) <= TAGS, f"plan text became markup: {_tags(page) - TAGS}"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;amp;" in page


def _synthetic(layers: int) -> Plan:
    """`layers` identical decoder layers (attention + one MLP projection) without capturing."""
    nodes = []
    for i in range(layers):
        nodes += [
            NodePlan(node=f"sdpa_{i}", module=f"layers.{i}.attn", op="attention",
                     splits=(Split("node", "s"), Split("gpu", "s")), algorithm="hybrid",
                     cost=Cost(compute_s=2e-3, comm_s=5e-4, redistribute_s=1e-4,
                               memory_bytes=2**28, comm_bytes=2**26, transient_bytes=2**27)),
            NodePlan(node=f"linear_{i}", module=f"layers.{i}.mlp.up_proj", op="linear",
                     splits=(Split("node", "s"),),
                     cost=Cost(compute_s=1e-3, memory_bytes=2**29)),
        ]
    return Plan(mesh=(("node", 16), ("gpu", 8)), nodes=tuple(nodes), orders=(("s", "zigzag"),),
                predicted=Predicted(step_s=0.25, peak_memory_bytes=80 * 2**30,
                                    comm_bytes=5 * 2**30, compute_s=0.24, comm_s=0.01))


def test_80_layers_fold_and_a_given_plan_renders():
    page = _synthetic(80).to_html()
    assert ">layers.0-79.attn<" in page and "×80" in page
    assert page.count("<tr>") == 3, "80 identical layers should fold into one row per part"
    assert "72.2%" in page and "27.8%" in page  # share of time: attention 2.6 ms, MLP 1.0 ms
    given = replace(_synthetic(1), predicted=None,
                    nodes=tuple(replace(n, cost=None) for n in _synthetic(1).nodes))
    page = given.to_html()
    assert "given, not solved" in page and _tags(page) <= TAGS


def test_cli_writes_the_page(tmp_path, capsys):
    from seqshard import cli

    out = tmp_path / "plan.html"
    assert cli.main(["plan", "--config", "tiny", "--seq", "4096", "--cluster", "h200x4",
                     "--html", str(out)]) == 0
    assert f"plan page written to {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and ">layers.0-1.attn<" in page


# ---------------------------------------------------------------------------------- Chromium

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _decode_png(data: bytes) -> np.ndarray:
    """8-bit RGB or RGBA PNG → array [height, width, channels] (zlib and the five row filters)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, "unexpected PNG format"
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        kind, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 1:    # Sub: a running sum per channel
            row = np.cumsum(row.reshape(width, bpp), axis=0).reshape(-1)
        elif kind == 2:  # Up
            row = row + prev
        elif kind in (3, 4):  # Average, Paeth: sequential along the row
            cur, up = row.tolist(), prev.tolist()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            row = np.array(cur)
        out[y] = prev = (row & 255).astype(np.uint8)
    return out.reshape(height, width, bpp)[..., :3]


def test_chromium_draws_the_page(plan, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed: scripts/setup.sh --dev installs Debian's chromium "
                    "package with apt-get; only the structural checks of the page ran")
    page, png = tmp_path / "plan.html", tmp_path / "plan.png"
    page.write_text(plan.to_html(), encoding="utf-8")
    run = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
                          "--window-size=1400,1000", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and png.exists(), f"chromium failed:\n{run.stderr[-2000:]}"
    pixels = _decode_png(png.read_bytes())
    assert pixels.shape == (1000, 1400, 3)
    inked = (pixels.min(axis=2) < 200).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert inked > 0.02 and colours > 50, \
        f"the screenshot looks blank: {inked:.2%} of pixels inked, {colours} colours"
    # the SVG bars and chips were drawn, not just the text: their exact fills are on screen
    for name, rgb in (("compute bar", (0x4c, 0x78, 0xa8)), ("exposed comm bar", (0xf5, 0x85, 0x18)),
                      ("s@sp chip", (0xae, 0xc7, 0xe8))):
        count = int((pixels == rgb).all(axis=2).sum())
        assert count > 100, f"{name} colour {rgb} covers only {count} pixels"
