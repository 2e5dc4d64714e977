"""A plan as one self-contained HTML page: `Plan.to_html()`, `seqshard plan --html FILE`.

    totals        predicted step (compute + exposed communication), peak memory, bytes sent
    strategy map  one row per layer, identical layers folded as in `Plan.rows()`: a colour per
                  layout (`s@sp`: mesh axis sp splits factor s) and per attention algorithm
    time          per layer, a stacked bar: compute, exposed communication, redistribution
    memory        per layer, a bar: activations kept, and the working memory while it runs
    alternatives  the table `Plan.explain` prints for each attention layer, each distinct one once

Pure string building: inline CSS and inline SVG, no scripts and no external URLs, so the file
opens anywhere, offline. Every piece of text from the plan goes through `html.escape`.
"""

from __future__ import annotations

import re
from html import escape

from .algorithms import ALGORITHMS, NAMES
from .plan import Plan, _fmt_b, _fmt_s, _layer_of

BAR_PX = 180  # width of the longest bar; the others scale to it

TIME_PARTS = (("compute", "#4c78a8"), ("exposed comm", "#f58518"), ("redistribution", "#e45756"))
MEMORY_PARTS = (("activations kept", "#54a24b"), ("working, while it runs", "#b8e0ad"))
LAYOUT_COLOURS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
                  "#dbdb8d", "#9edae5")
REPLICATED_COLOUR = "#e4e4e4"
ALGORITHM_COLOURS = ("#6b6b6b", "#1f77b4", "#2ca02c", "#8c564b", "#d62728", "#9467bd",
                     "#17becf", "#bcbd22")  # by position in the registry; "local" is grey

_SPAN = re.compile(r"\.(\d+)-(\d+)(?=\.|$)")  # the folded index of `layers.0-79.attn`

CSS = """
body { font-family: system-ui, "DejaVu Sans", "Liberation Sans", Arial, sans-serif;
       margin: 24px 32px; color: #222; background: #fff; font-size: 14px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
h3 { font-size: 14px; margin: 16px 0 4px; }
.muted { color: #666; font-weight: normal; }
.mono, td.layer, pre { font-family: "DejaVu Sans Mono", "Liberation Mono", Menlo, monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 14px 0 8px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card .v { font-size: 20px; font-weight: 600; } .card .k { color: #666; font-size: 12px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 6px 0; align-items: center; }
.legend .k { color: #666; margin-right: 4px; }
.chip { display: inline-block; padding: 1px 7px; border-radius: 9px; margin: 1px 2px;
        font-size: 12px; white-space: nowrap; font-family: "DejaVu Sans Mono", monospace; }
.alg { color: #fff; font-weight: 600; }
.sw { display: inline-block; width: 12px; height: 12px; vertical-align: -1px; margin-right: 4px;
      border-radius: 2px; }
table.map { border-collapse: collapse; margin-top: 6px; }
table.map th { text-align: left; font-weight: 600; border-bottom: 2px solid #ccc;
               padding: 4px 10px 4px 4px; white-space: nowrap; }
table.map td { border-bottom: 1px solid #eee; padding: 3px 10px 3px 4px; vertical-align: middle; }
table.map tr:nth-child(even) td { background: #fafafa; }
td.layer { white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.bar { white-space: nowrap; } td.bar svg { vertical-align: middle; }
td.bar span { display: inline-block; width: 84px; text-align: right; margin-right: 6px;
              font-variant-numeric: tabular-nums; }
.fold { color: #555; background: #eef; border-radius: 8px; padding: 0 6px; font-size: 11px;
        margin-left: 6px; font-family: system-ui, sans-serif; }
pre { background: #f6f6f6; border: 1px solid #e2e2e2; border-radius: 4px; padding: 8px 10px;
      font-size: 12px; overflow-x: auto; margin: 4px 0; width: fit-content; max-width: 100%; }
pre .chosen { background: #fff2b3; font-weight: 600; }
.step svg { vertical-align: middle; }
ul.notes { margin: 4px 0; padding-left: 20px; color: #444; }
"""


def to_html(plan: Plan) -> str:
    """The whole page for `plan`, as a string."""
    rows = plan.rows()
    parts = _breakdown(plan)
    layouts = _layout_colours(rows)
    head = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>seqshard plan {escape(plan.hash())}</title><style>{CSS}</style></head><body>")
    body = [_header(plan), _legend(layouts, rows), _table(rows, parts, layouts),
            _alternatives(plan)]
    return head + "\n".join(body) + "\n</body></html>\n"


# ---------------------------------------------------------------------------------- sections

def _header(plan: Plan) -> str:
    mesh = " × ".join(f"{a}={n}" for a, n in plan.mesh) or "(none)"
    orders = ", ".join(f"{f}:{o}" for f, o in plan.orders) or "contig"
    out = [f"<h1>seqshard plan <span class=\"mono\">{escape(plan.hash())}</span></h1>",
           f"<div class=\"muted\">mesh {escape(mesh)} · order {escape(orders)} · "
           f"{len(plan.nodes)} nodes, {len(plan.attention())} attention</div>"]
    p = plan.predicted
    if p is None:
        out.append("<p class=\"muted\">No predictions: the plan was given, not solved.</p>")
    else:
        # the predicted exposed communication includes the redistributions; the bar splits them
        redist = min(sum(n.cost.redistribute_s for n in plan.nodes if n.cost), p.comm_s)
        cards = (("predicted step", _fmt_s(p.step_s)), ("compute", _fmt_s(p.compute_s)),
                 ("exposed comm", _fmt_s(p.comm_s)), ("of it redistribution", _fmt_s(redist)),
                 ("peak memory per GPU", _fmt_b(p.peak_memory_bytes)),
                 ("sent per GPU", _fmt_b(p.comm_bytes)))
        out.append("<div class=\"cards\">" + "".join(
            f"<div class=\"card\"><div class=\"v\">{escape(v)}</div><div class=\"k\">{escape(k)}"
            f"</div></div>" for k, v in cards) + "</div>")
        step = [(TIME_PARTS[0], p.compute_s), (TIME_PARTS[1], p.comm_s - redist),
                (TIME_PARTS[2], redist)]
        bar = _svg_bar(step, max(p.step_s, p.compute_s + p.comm_s), _fmt_s, 4 * BAR_PX, 16)
        out.append(f"<div class=\"step\">{bar} <span class=\"muted\">step = compute + exposed comm "
                   "(redistribution included)</span></div>")
    if plan.notes:
        out.append("<ul class=\"notes\">" + "".join(f"<li>{escape(n)}</li>" for n in plan.notes)
                   + "</ul>")
    return "\n".join(out)


def _legend(layouts: dict[str, str], rows: list[tuple]) -> str:
    algos = sorted({a for r in rows for a in _split_list(r[2])}, key=_algorithm_index)
    out = ["<h2>Strategy map <span class=\"muted\">one row per layer; identical layers folded "
           "(×N); time and memory are per layer</span></h2>",
           "<div class=\"legend\"><span class=\"k\">layouts</span>"
           + "".join(_chip(lay, layouts[lay]) for lay in layouts)
           + "<span class=\"muted\">f@a: mesh axis a splits factor f</span></div>"]
    if algos:
        out.append("<div class=\"legend\"><span class=\"k\">attention</span>" + "".join(
            f"<span title=\"{escape(ALGORITHMS[a].summary if a in ALGORITHMS else a)}\">"
            f"{_algorithm_chip(a)}</span>" for a in algos) + "</div>")
    out.append("<div class=\"legend\"><span class=\"k\">time</span>" + "".join(
        f"<span><span class=\"sw\" style=\"background:{c}\"></span>{escape(k)}</span>"
        for k, c in TIME_PARTS) + "<span class=\"k\">memory</span>" + "".join(
        f"<span><span class=\"sw\" style=\"background:{c}\"></span>{escape(k)}</span>"
        for k, c in MEMORY_PARTS) + "</div>")
    return "\n".join(out)


def _table(rows: list[tuple], parts: dict[str, tuple], layouts: dict[str, str]) -> str:
    zero = (0.0,) * 6
    t_max = max([sum(parts.get(_first(r[0]), zero)[:3]) for r in rows] + [1e-30])
    m_max = max([sum(parts.get(_first(r[0]), zero)[3:5]) for r in rows] + [1e-30])
    out = ["<table class=\"map\"><tr><th>layer</th><th>layouts</th><th>attention</th>"
           "<th>time per layer</th><th title=\"time of all its layers over the time of all rows\">"
           "share</th><th>memory per layer</th><th>sent</th><th>nodes</th></tr>"]
    total = sum(r[3] * _layers_in(r[0]) for r in rows) or 1.0
    for layer, lays, algos, t, mem, sent, count in rows:
        compute, comm, redist, kept, working, _ = parts.get(_first(layer), zero)
        fold = f"<span class=\"fold\">×{_layers_in(layer)}</span>" if _SPAN.search(layer) else ""
        time_bar = _svg_bar([(TIME_PARTS[0], compute), (TIME_PARTS[1], comm),
                             (TIME_PARTS[2], redist)], t_max, _fmt_s)
        mem_bar = _svg_bar([(MEMORY_PARTS[0], kept), (MEMORY_PARTS[1], working)], m_max, _fmt_b)
        out.append(
            f"<tr><td class=\"layer\">{escape(layer)}{fold}</td>"
            f"<td class=\"chips\">{''.join(_chip(x, layouts[x]) for x in _split_list(lays))}</td>"
            f"<td class=\"chips\">{''.join(_algorithm_chip(a) for a in _split_list(algos))}</td>"
            f"<td class=\"bar\"><span>{escape(_fmt_s(t))}</span>{time_bar}</td>"
            f"<td class=\"num\">{100 * t * _layers_in(layer) / total:.1f}%</td>"
            f"<td class=\"bar\"><span>{escape(_fmt_b(mem))}</span>{mem_bar}</td>"
            f"<td class=\"num\">{escape(_fmt_b(sent))}</td><td class=\"num\">{count}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _alternatives(plan: Plan) -> str:
    """Each distinct `explain` text once, headed by the first layer it belongs to."""
    modules: dict[str, list[str]] = {}  # text → modules, in plan order
    by_name = plan.by_name()
    order = [n.node for n in plan.nodes if n.node in plan.explanations]
    order += [k for k in plan.explanations if k not in by_name]
    for key in order:
        node = by_name.get(key)
        modules.setdefault(plan.explanations[key], []).append(node.module if node else key)
    if not modules:
        return ("<h2>Alternatives</h2><p class=\"muted\">None recorded: the plan was given, "
                "not solved.</p>")
    out = ["<h2>Alternatives <span class=\"muted\">what <span class=\"mono\">plan.explain"
           "</span> lists: every strategy the planner priced for a layer, with the rest of the "
           "plan as chosen</span></h2>"]
    for text, mods in modules.items():
        more = f" <span class=\"muted\">and {len(mods) - 1} more alike</span>" if len(mods) > 1 else ""
        lines = [f"<span class=\"chosen\">{escape(ln)}</span>" if "← chosen" in ln else escape(ln)
                 for ln in text.splitlines()]
        out.append(f"<h3 class=\"mono\">{escape(mods[0])}{more}</h3><pre>" + "\n".join(lines)
                   + "</pre>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- pieces

def _breakdown(plan: Plan) -> dict[str, tuple]:
    """layer (as `Plan.rows` names it, unfolded) → (compute, exposed comm, redistribution,
    activations kept, most working memory of one node, bytes sent)."""
    out: dict[str, list[float]] = {}
    for n in plan.nodes:
        if n.cost is None:
            continue
        c = out.setdefault(_layer_of(n.module) or "(top)", [0.0] * 6)
        c[0] += n.cost.compute_s
        c[1] += n.cost.comm_s
        c[2] += n.cost.redistribute_s
        c[3] += n.cost.memory_bytes
        c[4] = max(c[4], n.cost.transient_bytes)
        c[5] += n.cost.comm_bytes
    return {k: tuple(v) for k, v in out.items()}


def _first(layer: str) -> str:
    """`layers.0-79.attn` → `layers.0.attn`: a folded row's layers are alike, so the first
    one's figures stand for each."""
    return _SPAN.sub(lambda m: "." + m[1], layer, count=1)


def _layers_in(layer: str) -> int:
    """How many layers a row stands for: 80 for `layers.0-79.attn`, else 1."""
    m = _SPAN.search(layer)
    return int(m[2]) - int(m[1]) + 1 if m else 1


def _split_list(text: str) -> list[str]:
    return [x for x in text.split(", ") if x and x != "-"]


def _layout_colours(rows: list[tuple]) -> dict[str, str]:
    names = [x for r in rows for x in _split_list(r[1])]
    ordered = sorted(set(names), key=lambda s: (s == "replicated", names.index(s)))
    out, i = {}, 0
    for name in ordered:
        if name == "replicated":
            out[name] = REPLICATED_COLOUR
        else:
            out[name] = LAYOUT_COLOURS[i % len(LAYOUT_COLOURS)]
            i += 1
    return out


def _algorithm_index(name: str) -> int:
    return NAMES.index(name) if name in NAMES else len(NAMES)


def _chip(text: str, colour: str) -> str:
    return f"<span class=\"chip\" style=\"background:{colour}\">{escape(text)}</span>"


def _algorithm_chip(name: str) -> str:
    colour = ALGORITHM_COLOURS[_algorithm_index(name) % len(ALGORITHM_COLOURS)]
    return f"<span class=\"chip alg\" style=\"background:{colour}\">{escape(name)}</span>"


def _svg_bar(parts: list[tuple[tuple[str, str], float]], scale: float, fmt, width: int = BAR_PX,
             height: int = 12) -> str:
    """A stacked horizontal bar: each ((label, colour), value) a segment, `scale` the full width;
    `fmt` writes a value for the tooltip."""
    x, rects, tips = 0.0, [], []
    for (label, colour), value in parts:
        w = width * value / scale
        if w > 0:
            rects.append(f"<rect x=\"{x:.2f}\" y=\"0\" width=\"{w:.2f}\" height=\"{height}\" "
                         f"fill=\"{colour}\"/>")
        x += w
        tips.append(f"{label} {fmt(value)}")
    return (f"<svg width=\"{width}\" height=\"{height}\" role=\"img\"><title>"
            f"{escape(', '.join(tips))}</title><rect width=\"{width}\" height=\"{height}\" "
            f"fill=\"#f1f1f1\"/>{''.join(rects)}</svg>")
