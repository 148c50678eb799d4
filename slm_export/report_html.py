"""``report.html``: the summary of ``report.md`` with two plots (per-layer error; measured speeds against the
target's bounds), in one self-contained file: inline CSS and SVG, no script, nothing fetched from a network."""

from __future__ import annotations

from html import escape
from typing import Any

from slm_export.report_md import fmt, headline

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left;
vertical-align:top}.PASS{color:#16702a}.FAIL{color:#b3261e}.verdict{font-size:1.3em;font-weight:600}
svg text{font:11px system-ui,sans-serif}small{color:#666}"""


def render_html(r: dict[str, Any]) -> str:
    title = f"slm-export report: {r['model']['name']} for {r['target']['id']}"
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
             f"<p class='verdict {escape(r['verdict'].split()[0])}' id=verdict>Verdict: {escape(r['verdict'])}</p>",
             _summary_table(r), _goals_table(r), "<h2>Measured speed against the target's bounds</h2>",
             speed_chart(r), "<h2>Per-layer error</h2>", layer_chart(r), loads_table_html(r), _notes(r),
             "<p><small>The full tables (every metric, layer, stage and the plan) are in report.md and "
             "report.json beside this file.</small></p></body></html>"]
    return "\n".join(parts)


def _summary_table(r: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(a)}</th><td>{escape(b)}</td><td><small>{escape(c)}</small></td></tr>"
                   for a, b, c in headline(r))
    return f"<table id=summary>{rows}</table>"


def _goals_table(r: dict[str, Any]) -> str:
    if not r.get("goals"):
        return "<p>No goals.</p>"
    rows = "".join(
        f"<tr><td>{escape(g['metric'])}</td><td>{escape(g['op'])} {escape(fmt(g['threshold']))}</td>"
        f"<td>{escape(fmt(g.get('value')))}</td><td class={escape(g['status'])}>{escape(g['status'])}</td></tr>"
        for g in r["goals"])
    return f"<h2>Goals</h2><table id=goals><tr><th>metric</th><th>goal</th><th>value</th><th></th></tr>{rows}</table>"


STATUS_CLASS = {"loads": "PASS", "fails": "FAIL"}  # the goals' colours


def loads_table_html(r: dict[str, Any]) -> str:
    """Which runtime loads which file (``runtime_loads``): a row per file, a column per runtime."""
    from slm_export.validation.loads import RUNTIME_NAMES, cell_text, loads_table

    if not r.get("runtime_loads"):
        return ""
    files, runtimes, cells = loads_table(r["runtime_loads"])
    head = "".join(f"<th>{escape(n)}</th>" for n in runtimes)
    rows = "".join(f"<tr><td><code>{escape(f)}</code></td>" + "".join(
        f"<td class='{STATUS_CLASS.get(cells[(f, n)]['status'], '') if (f, n) in cells else ''}'>"
        f"{escape(cell_text(cells.get((f, n))))}</td>" for n in runtimes) + "</tr>" for f in files)
    others = [n for n in RUNTIME_NAMES if n not in runtimes]
    return (f"<h2>Runtimes that load these files</h2><table id=runtime-loads><tr><th>file</th>{head}</tr>{rows}"
            "</table><p><small>A load, no generation; \"not checked here\": the runtime is not installed where "
            "this was validated." + (f" No file of this artifact is for {escape(', '.join(others))}." if others
                                     else "") + "</small></p>")


def _notes(r: dict[str, Any]) -> str:
    if not r.get("notes"):
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in r["notes"]) + "</ul>"


def bars(chart_id: str, rows: list[tuple[str, float, str]], unit: str, empty: str) -> str:
    """A horizontal bar chart as inline SVG: (label, value, css colour) rows, values >= 0."""
    if not rows:
        return f"<p id={chart_id}>{escape(empty)}</p>"
    top = max(v for _, v, _ in rows) or 1.0
    width, label_w, row_h = 640, 230, 18
    height = row_h * len(rows) + 10
    out = [f"<svg id={chart_id} xmlns='http://www.w3.org/2000/svg' width={width + label_w + 90} height={height} "
           f"role=img aria-label='{escape(chart_id)}'>"]
    for i, (label, value, colour) in enumerate(rows):
        y = 5 + i * row_h
        w = max(1.0, width * value / top)
        out.append(f"<text x={label_w - 6} y={y + 12} text-anchor=end>{escape(label[:40])}</text>"
                   f"<rect class=bar x={label_w} y={y} width={w:.1f} height={row_h - 4} fill='{colour}'>"
                   f"<title>{escape(label)}: {value:.4g} {escape(unit)}</title></rect>"
                   f"<text x={label_w + w + 4:.1f} y={y + 12}>{value:.3g} {escape(unit)}</text>")
    out.append("</svg>")
    return "".join(out)


def speed_chart(r: dict[str, Any]) -> str:
    """Every decode rate measured (host, emulated, device) beside the roofline bounds they are judged against."""
    m = r.get("metrics", {})
    rows = [(f"{k.removesuffix('_decode_tokens_per_s_bound')} bound (estimated)", float(v), "#9aa5b1")
            for k, v in r.get("roofline", {}).items() if k.endswith("_decode_tokens_per_s_bound")]
    for name, metric in m.items():
        if name.endswith("decode_tokens_per_s_p50") and isinstance(metric.get("value"), int | float):
            rows.append((_speed_label(name), float(metric["value"]), "#2f6fb0"))
    return bars("speeds", rows, "tok/s", "No decode speed was measured (an encoder, or validation was skipped).")


def _speed_label(name: str) -> str:
    if name == "decode_tokens_per_s_p50":
        return "this host, measured"
    if name.startswith("emulated_"):
        return f"{name[9:].removesuffix('_decode_tokens_per_s_p50')} emulated (not device speed)"
    return name.removesuffix("_decode_tokens_per_s_p50").replace("_", " ") + ", measured"


def layer_chart(r: dict[str, Any]) -> str:
    """Each compressed layer's signal-to-noise ratio (output where calibration measured it, else weights):
    the shortest bars are the layers that lose the most."""
    comp = r.get("compression") or {}
    rows = []
    for e in comp.get("layers", []):
        value = e.get("output_sqnr_db", e.get("weight_sqnr_db"))
        if isinstance(value, int | float):
            rows.append((str(e["layer"]).removeprefix("model."), max(0.0, float(value)), "#c77c02"))
    return bars("layer-error", rows, "dB", "No layer was compressed (a float artifact): no per-layer error.")
