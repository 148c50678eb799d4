"""The matrix's comparison report: ``matrix.json`` (every cell's status and figures), ``matrix.md`` (the
table) and ``matrix.html`` (per target, accuracy against decode speed and against size, the Pareto front
marked, each point linked to its cell's report.html). Figures are read from each cell's report.json.
Self-contained like report.html: inline CSS and SVG, no script, nothing fetched."""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path
from typing import Any

from slm_export.report_html import CSS
from slm_export.report_md import fmt

MARKER = "slm-export matrix"  # matrix.json's "tool": a folder holding it is a matrix's out folder
REPORTS = ("matrix.json", "matrix.md", "matrix.html")
STATUS_CLASS = {"passed": "PASS", "skipped": "PASS", "goals missed": "FAIL", "failed": "FAIL"}


def figures(row: dict[str, Any]) -> dict[str, Any]:
    """A cell's accuracy (perplexity change, %), host decode speed (tok/s) and size (MB) from its report.json;
    None where the cell has no report or did not measure it."""
    folder = row.get("folder")
    try:
        report = json.loads((Path(folder) / "report.json").read_text(encoding="utf-8")) if folder else None
    except (OSError, ValueError):
        report = None
    metrics = report.get("metrics", {}) if isinstance(report, dict) else {}

    def value(name: str) -> float | None:
        v = (metrics.get(name) or {}).get("value")
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    size = value("artifact_bytes")
    if size is None and isinstance(report, dict):
        size = (report.get("artifact") or {}).get("bytes")
    return {"ppl_change_pct": value("perplexity_change_pct"), "decode_tok_s": value("decode_tokens_per_s_p50"),
            "size_mb": round(size / 1e6, 3) if isinstance(size, int | float) else None}


def rows_of(results: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        row = {**r, **figures(r)}
        html = Path(r["folder"]) / "report.html" if r.get("folder") else None
        row["report"] = os.path.relpath(html, out) if html is not None and html.is_file() else None
        rows.append(row)
    return rows


def write_reports(out: Path, source: str, rows: list[dict[str, Any]], exit_code: int) -> None:
    """The three files, each written whole then renamed into place."""
    data = {"tool": MARKER, "source": source, "exit_code": exit_code, "cells": rows}
    texts = {"matrix.json": json.dumps(data, indent=2, default=str) + "\n", "matrix.md": render_md(rows, exit_code),
             "matrix.html": render_html(rows, exit_code)}
    for name, text in texts.items():
        tmp = out / f".{name}.partial-{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


COLUMNS = ("target", "model", "precision", "method", "status", "perplexity change %", "decode tok/s", "size MB",
           "report")


def render_md(rows: list[dict[str, Any]], exit_code: int) -> str:
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in STATUS_CLASS)
    lines = ["# slm-export matrix", "", f"{len(rows)} cells: {counts}; exit code {exit_code}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(rows, key=_order):
        link = f"[report]({r['report']})" if r.get("report") else ""
        status = r["status"] + (f": {_one_line(r['message'])}" if r["status"] == "failed" else "")
        cells = (r["target"], Path(r["model"]).name, r["precision"], r.get("method") or "", status,
                 _num(r["ppl_change_pct"]), _num(r["decode_tok_s"]), _num(r["size_mb"]), link)
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Perplexity change against the float model and decode speed are measured on this host "
              "(cells that ran side by side shared its cores); size is the artifact's files. "
              "Each cell's report.md has every figure and where it was measured."]
    return "\n".join(lines) + "\n"


def _order(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["target"], Path(r["model"]).name, r["precision"], r.get("method") or "")


def _num(v: Any) -> str:
    return "" if v is None else fmt(float(v))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 160 else text[:157] + "..."


def pareto(points: list[tuple[float, float]], bigger_x_better: bool) -> set[int]:
    """Indices of the points no other point beats on both axes (y: lower is better)."""
    front = set()
    for i, (x, y) in enumerate(points):
        beaten = any((x2 >= x if bigger_x_better else x2 <= x) and y2 <= y and (x2, y2) != (x, y)
                     for j, (x2, y2) in enumerate(points) if j != i)
        if not beaten:
            front.add(i)
    return front


def render_html(rows: list[dict[str, Any]], exit_code: int) -> str:
    parts = ["<!doctype html><html lang=en><head><meta charset=utf-8><title>slm-export matrix</title>",
             f"<style>{CSS}.front{{fill:#16702a}}.other{{fill:#2f6fb0}}</style></head><body>",
             "<h1>slm-export matrix</h1>", f"<p>{len(rows)} cells; exit code {exit_code}. Accuracy is the perplexity "
             "change against the float model (lower is better); green points are the Pareto front (no other cell "
             "is both as accurate and faster, or smaller). Each point links to its cell's report.</p>"]
    for target in sorted({r["target"] for r in rows}):
        mine = sorted((r for r in rows if r["target"] == target), key=_order)
        parts += [f"<h2 id='{escape(target)}'>{escape(target)}</h2>",
                  scatter(f"speed-{target}", mine, "decode_tok_s", "decode tok/s (host)", True),
                  scatter(f"size-{target}", mine, "size_mb", "size MB", False), _table(mine)]
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS[1:])
    body = []
    for r in rows:
        link = f"<a href='{escape(r['report'])}'>{escape(r['cell'])}</a>" if r.get("report") else escape(r["cell"])
        status = escape(r["status"]) + (f" <small>{escape(_one_line(r['message']))}</small>"
                                        if r["status"] == "failed" else "")
        cells = [Path(r["model"]).name, r["precision"], r.get("method") or "", None, _num(r["ppl_change_pct"]),
                 _num(r["decode_tok_s"]), _num(r["size_mb"])]
        tds = "".join(f"<td>{escape(str(c))}</td>" if c is not None else
                      f"<td class={STATUS_CLASS[r['status']]}>{status}</td>" for c in cells)
        body.append(f"<tr>{tds}<td>{link}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def scatter(chart_id: str, rows: list[dict[str, Any]], x_key: str, x_label: str, bigger_x_better: bool) -> str:
    """Accuracy (y, perplexity change %) against ``x_key`` as inline SVG; the front joined by a line."""
    pts = [(float(r[x_key]), float(r["ppl_change_pct"]), r) for r in rows
           if r.get(x_key) is not None and r.get("ppl_change_pct") is not None]
    if not pts:
        return f"<p id='{escape(chart_id)}'>No cell of this target measured both {escape(x_label)} and accuracy.</p>"
    w, h, left, bottom = 560, 300, 60, 40
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = _span(xs)
    y0, y1 = _span(ys)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - 130)  # room for the last point's label

    def py(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - bottom - 20)

    front = pareto([(x, y) for x, y, _ in pts], bigger_x_better)
    line = " ".join(f"{px(pts[i][0]):.1f},{py(pts[i][1]):.1f}" for i in sorted(front, key=lambda i: pts[i][0]))
    out = [f"<svg id='{escape(chart_id)}' xmlns='http://www.w3.org/2000/svg' width={w} height={h} role=img "
           f"aria-label='{escape(chart_id)}'>",
           f"<line x1={left} y1={h - bottom} x2={w - 10} y2={h - bottom} stroke='#999'/>",
           f"<line x1={left} y1=10 x2={left} y2={h - bottom} stroke='#999'/>",
           f"<text x={(w + left) / 2:.0f} y={h - 8} text-anchor=middle>{escape(x_label)}</text>",
           f"<text x=12 y={(h - bottom) / 2:.0f} transform='rotate(-90 12 {(h - bottom) / 2:.0f})' "
           "text-anchor=middle>perplexity change %</text>",
           *_ticks(x0, x1, y0, y1, px, py, h - bottom, left),
           f"<polyline class=front-line points='{line}' fill=none stroke='#16702a' stroke-dasharray='4 3'/>"]
    for i, (x, y, r) in enumerate(pts):
        cls = "front" if i in front else "other"
        dot = (f"<circle class={cls} cx={px(x):.1f} cy={py(y):.1f} r=5><title>{escape(r['cell'])}: {fmt(x)} "
               f"{escape(x_label)}, {fmt(y)}% perplexity change{' (Pareto front)' if i in front else ''}</title>"
               "</circle>")
        short = "-".join(x for x in (Path(r["model"]).name, r["precision"], r.get("method")) if x)
        dot += f"<text x={px(x) + 7:.1f} y={py(y) - 6:.1f}>{escape(short)}</text>"
        out.append(f"<a href='{escape(r['report'])}'>{dot}</a>" if r.get("report") else dot)
    out.append("</svg>")
    return "".join(out)


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def _ticks(x0: float, x1: float, y0: float, y1: float, px: Any, py: Any, base: float, left: float) -> list[str]:
    out = []
    for k in range(5):
        x = x0 + (x1 - x0) * (k + 0.5) / 5
        y = y0 + (y1 - y0) * (k + 0.5) / 5
        out.append(f"<text x={px(x):.1f} y={base + 14:.1f} text-anchor=middle>{fmt(x)}</text>")
        out.append(f"<text x={left - 4} y={py(y) + 4:.1f} text-anchor=end>{fmt(y)}</text>")
    return out
