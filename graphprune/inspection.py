"""``graphprune inspect``: what the analysis found in a traced graph, as JSON-ready data
and as a self-contained HTML page that draws the op graph in SVG (nodes coloured by group,
barriers outlined in red, a tooltip per node)."""
from __future__ import annotations

from dataclasses import asdict
from html import escape
from typing import TYPE_CHECKING, Any

import networkx as nx

from .analysis.groups import Group
from .report import macs

if TYPE_CHECKING:
    from .prunable import PrunableGraph


def inspect_data(g: PrunableGraph) -> dict[str, Any]:
    """A traced graph's groups, barriers and totals as JSON-ready data."""
    return {"source": g.ir.source, "frontend": g.ir.frontend, "params": g.total_params,
            "grouped_params": g.grouped_params, "flops": g.total_flops,
            "groups": [{"id": grp.id, "name": grp.name, "kind": grp.kind, "size": grp.size,
                        "params_per_unit": grp.params_per_unit, "flops_per_unit": grp.flops_per_unit,
                        "params": sorted({s.param for s in grp.slices})} for grp in g.groups],
            "barriers": [asdict(b) for b in g.barriers],
            "withdrawn": [{"group": grp.name, "reason": reason} for grp, reason in g.withdrawn],
            "why_no_groups": g.why_no_groups}


_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")


def _node_groups(g: PrunableGraph) -> dict[str, list[Group]]:
    """Op node name -> the groups that slice its parameters, the group it produces first."""
    by_param: dict[str, list[Group]] = {}
    for grp in g.groups:
        for s in grp.slices:
            by_param.setdefault(s.param, []).append(grp)
    out = {}
    for node in g.ir.nodes:
        found = []
        for name in node.inputs:
            value = g.ir.values.get(name)
            if value is not None and value.kind == "param":
                found += [grp for grp in by_param.get(value.source_name or name, []) if grp not in found]
        found.sort(key=lambda grp: grp.name != node.module)  # the group this layer produces leads
        out[node.name] = found
    return out


def _layout(g: PrunableGraph) -> dict[str, tuple[int, int]]:
    """Op node -> (layer, column): layers are networkx's topological generations, so every
    edge points down the page, inputs at the top."""
    produced = g.ir.producers()
    dag = nx.DiGraph()
    for n in g.ir.nodes:
        dag.add_node(n.name)
        dag.add_edges_from((produced[i].name, n.name) for i in n.inputs if i in produced)
    return {name: (depth, col) for depth, layer in enumerate(nx.topological_generations(dag))
            for col, name in enumerate(layer)}


def _edge(start: tuple[float, float], end: tuple[float, float], layers: int, box_w: int, box_h: int) -> str:
    """An SVG edge between two boxes: straight to the next layer; a skip over several layers
    bows out to the right, so it does not hide behind the boxes it passes."""
    (x0, y0), (x1, y1) = start, end
    if layers <= 1:
        return (f'<line x1="{x0 + box_w / 2:.0f}" y1="{y0 + box_h:.0f}" x2="{x1 + box_w / 2:.0f}" y2="{y1:.0f}" '
                f'stroke="#999"/>')
    bow = 30 + 6 * min(layers, 8)
    return (f'<path d="M {x0 + box_w:.0f} {y0 + box_h / 2:.0f} C {x0 + box_w + bow:.0f} {y0 + box_h / 2:.0f}, '
            f'{x1 + box_w + bow:.0f} {y1 + box_h / 2:.0f}, {x1 + box_w:.0f} {y1 + box_h / 2:.0f}" '
            f'fill="none" stroke="#999"/>')


def _luminance(hex_colour: str) -> float:
    """Relative brightness in [0, 1] of ``#rrggbb``: dark text goes on light boxes."""
    r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b


def _tail(text: str, width: int) -> str:
    """The end of a long name, where its most specific part is (``…layer4.1/conv1/Conv``)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def inspect_html(g: PrunableGraph) -> str:
    """A self-contained HTML page: the op graph as SVG, nodes coloured by group, barriers in red."""
    pos = _layout(g)
    groups = _node_groups(g)
    colour = {grp.id: _PALETTE[i % len(_PALETTE)] for i, grp in enumerate(g.groups)}
    barrier_nodes = {b.node: b for b in g.barriers}
    box_w, box_h, step_x, step_y = 190, 30, 210, 54
    columns: dict[int, int] = {}
    for layer, col in pos.values():
        columns[layer] = max(columns.get(layer, 0), col + 1)
    width = max(max(columns.values(), default=1) * step_x + 100, 400)  # room for skip edges on the right

    def xy(name: str) -> tuple[float, float]:
        layer, col = pos[name]
        return (width - columns[layer] * step_x) / 2 + col * step_x + 10, 20 + layer * step_y

    produced = {value: node.name for value, node in g.ir.producers().items()}
    edges, boxes = [], []
    for n in g.ir.nodes:
        x1, y1 = xy(n.name)
        for i in n.inputs:
            if i in produced:
                edges.append(_edge(xy(produced[i]), (x1, y1), pos[n.name][0] - pos[produced[i]][0], box_w, box_h))
        grps = groups[n.name]
        fill = colour[grps[0].id] if grps else "#f0f0f0"
        barrier = barrier_nodes.get(n.name)
        stroke = 'stroke="#d00" stroke-width="3" stroke-dasharray="5,3"' if barrier else 'stroke="#333"'
        tip = [f"{n.name} [{n.op}] {n.module}"] + [f"group {grp.id} {grp.name}: {grp.size} {grp.kind}s" for grp in grps]
        if barrier:
            tip.append(f"BARRIER: {barrier.reason}")
        text_colour = "#000" if _luminance(fill) > 0.55 else "#fff"
        boxes.append(f'<g><title>{escape(chr(10).join(tip))}</title>'
                     f'<rect x="{x1:.0f}" y="{y1:.0f}" width="{box_w}" height="{box_h}" rx="5" fill="{fill}" {stroke}/>'
                     f'<text x="{x1 + box_w / 2:.0f}" y="{y1 + 19:.0f}" fill="{text_colour}" text-anchor="middle">'
                     f'{escape(_tail(n.module or n.name, 20))} · {escape(n.op[:10])}</text></g>')
    height = 40 + len(columns) * step_y
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
           f'font-family="sans-serif" font-size="11">{"".join(edges)}{"".join(boxes)}</svg>')
    legend = "".join(f'<tr><td style="background:{colour[grp.id]}">&nbsp;&nbsp;&nbsp;</td><td>{grp.id}</td>'
                     f'<td>{escape(grp.name)}</td><td>{grp.kind}</td><td>{grp.size}</td></tr>' for grp in g.groups)
    barriers = "".join(f"<li><code>{escape(b.node)}</code> [{escape(b.op)}] {escape(b.module)}: {escape(b.reason)}</li>"
                       for b in g.barriers) or "<li>none</li>"
    title = escape(f"graphprune inspect: {g.ir.source}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:20px} td{padding:2px 8px} .row{display:flex;gap:30px}</style>"
            f"</head><body><h1>{title}</h1><p>{len(g.groups)} groups, {g.grouped_params:,} of {g.total_params:,} "
            f"parameters in groups, {macs(g.total_flops)} MACs. Hover a node for its groups.</p>"
            f"<div class='row'><div>{svg}</div><div><h2>Groups</h2><table><tr><th></th><th>id</th><th>name</th>"
            f"<th>kind</th><th>units</th></tr>{legend}</table><h2>Barriers (red, channels kept)</h2>"
            f"<ul>{barriers}</ul></div></div></body></html>\n")
