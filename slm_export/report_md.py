"""Markdown and JUnit forms of a report: a summary a person reads in ten seconds first (verdict, artifact, accuracy,
what the target should reach beside every speed measured and where, goals), the long tables after it."""

from __future__ import annotations

import json
from typing import Any


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary(r: dict[str, Any]) -> list[str]:
    """Verdict, artifact and size, accuracy, the target's estimated decode speed beside every speed measured and
    where, then the goals, one line each."""
    lines = [f"# slm-export report: {r['model']['name']} for {r['target']['id']}", "", _verdict_line(r), ""]
    lines.append(_artifact_line(r))
    lines += ["", "| | value | where |", "|---|---|---|"]
    lines += [f"| {label} | {value} | {where} |" for label, value, where in headline(r)]
    for g in r.get("goals", [])[:6]:
        lines.append(f"- {g['status']}: {g['metric']} = {fmt(g.get('value'))} (goal {g['op']} {fmt(g['threshold'])})")
    return lines


def _verdict_line(r: dict[str, Any]) -> str:
    goals = r.get("goals", [])
    missed = [g for g in goals if g["status"] != "PASS"]
    if r["verdict"] == "FAIL":
        return f"**Verdict: FAIL**: {len(missed)} of {len(goals)} goals missed."
    if goals:
        return f"**Verdict: {r['verdict']}**: {len(goals)} of {len(goals)} goals met."
    return f"**Verdict: {r['verdict']}**"


def _artifact_line(r: dict[str, Any]) -> str:
    plan = r.get("plan", {})
    size = r.get("metrics", {}).get("artifact_bytes", {}).get("value")
    where = (r.get("output") or {}).get("folder", "this folder")
    form = plan.get("precision", "?")
    if plan.get("method"):
        form += f" {plan['method']}"
        if plan.get("method") not in ("smoothquant", "dynamic"):
            form += f", group {plan.get('group_size')}{', symmetric' if plan.get('symmetric') else ''}"
    size_text = f"{size / 1e6:.1f} MB" if isinstance(size, int | float) else "size not measured"
    ran = f", validated file `{r['validated_file']}`" if r.get("validated_file") else ""
    return f"Artifact: `{where}` ({size_text}{ran}); {form}; backends: " + \
        ", ".join(f"{b['backend']} ({b['status']})" for b in r.get("backends", []))


# (metric, label, how to show it): the accuracy and speed rows of the summary, when measured
_ACCURACY = (("perplexity_change_pct", "perplexity change", lambda v: f"{v:+.2f}%"),
             ("mean_kl", "mean KL to the float model", lambda v: f"{v:.4f}"),
             ("top1_agreement", "top-1 agreement", lambda v: f"{100 * v:.1f}%"),
             ("embedding_cosine_min", "embedding cosine (min)", lambda v: f"{v:.5f}"))
_SPEEDS = (("decode_tokens_per_s_p50", "decode, measured", "tok/s"), ("ttft_ms_p50", "time to first token", "ms"),
           ("device_decode_tokens_per_s_p50", "decode on the device", "tok/s"))


def headline(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, value, where) rows: accuracy, the target's estimate, and every decode speed measured."""
    m, rows = r.get("metrics", {}), []
    for name, label, show in _ACCURACY:
        if name in m and isinstance(m[name].get("value"), int | float):
            rows.append((label, show(m[name]["value"]), _short(m[name]["where"])))
    target = r["target"]["id"]
    bound = r.get("roofline", {}).get(f"{target}_decode_tokens_per_s_bound")
    if bound:
        rows.append((f"{target} decode, estimated", f"{bound:.1f} tok/s",
                     f"roofline of the {target} profile (bandwidth / bytes read per token), not measured"))
    for name, label, unit in _SPEEDS:
        if name in m:
            rows.append((label, f"{m[name]['value']:.4g} {unit}", _short(m[name]["where"])))
    for name in ("energy_per_token_j", "energy_per_inference_j"):
        if name in m:
            e = m[name]
            rows.append((f"energy, {e.get('source', 'estimated')}", f"{1000 * e['value']:.4g} m{e['unit']}",
                         _short(e["where"])))
    for name, metric in m.items():
        if name.startswith("emulated_") and name.endswith("_decode_tokens_per_s_p50"):
            rows.append((f"decode, {name[9:-24]} emulated", f"{metric['value']:.3g} tok/s", _short(metric["where"])))
    return rows


def _short(where: str) -> str:
    return where if len(where) <= 110 else where[:107] + "..."


def render_markdown(r: dict[str, Any]) -> str:
    """The report for people: the summary (at most 25 lines), then notes, goals, metrics, compression, backends,
    roofline, stages, plan and versions."""
    lines = summary(r)
    for section in (_notes, _goals, _metrics, _compression, _backends, _loads, _roofline, _stages):
        lines += section(r)
    lines += ["", "## Plan", "", "```json", json.dumps(r["plan"], indent=2), "```", ""]
    lines += ["## Versions", ""] + [f"- {k}: {v}" for k, v in r["versions"].items()] + [""]
    return "\n".join(lines)


def _notes(r: dict[str, Any]) -> list[str]:
    return ["", "## Notes", ""] + [f"- {note}" for note in r["notes"]] if r.get("notes") else []


def _goals(r: dict[str, Any]) -> list[str]:
    if not r.get("goals"):
        return []
    lines = ["", "## Goals", "", "| metric | goal | value | where | status |", "|---|---|---|---|---|"]
    for g in r["goals"]:
        lines.append(f"| {g['metric']} | {g['op']} {fmt(g['threshold'])} | {fmt(g.get('value'))} | "
                     f"{g.get('where', '')} | {g['status']} |")
    return lines


def _metrics(r: dict[str, Any]) -> list[str]:
    if not r.get("metrics"):
        return []
    lines = ["", "## Metrics", "", "| metric | value | unit | where |", "|---|---|---|---|"]
    for name, m in r["metrics"].items():
        value = m["value"] if not isinstance(m["value"], str) else m["value"].replace("\n", " ")[:120]
        lines.append(f"| {name} | {fmt(value)} | {m['unit']} | {m['where']} |")
    return lines


def _compression(r: dict[str, Any]) -> list[str]:
    comp = r.get("compression")
    if not comp:
        return []
    lines = ["", "## Compression", ""]
    if comp["bits_per_weight"] is not None:
        lines.append(f"- mean bits per weight (linear layers and LM head, scales included): "
                     f"{comp['bits_per_weight']:.2f}")
    lines.append(f"- time: {comp['seconds']:.1f} s")
    if comp.get("calibration"):
        c = comp["calibration"]
        lines.append(f"- calibration: {c['samples']} x {c['seqlen']} tokens from {c['source']} "
                     f"(seed {c['seed']}, sha256 {c['sha256'][:16]})")
    lines += [f"- {n}" for n in comp.get("notes", [])]
    if comp.get("budget"):
        top = ", ".join(f"{u} ({kl:.3g})" for u, kl in comp["budget"]["sensitivity_kl"][:8])
        lines.append(f"- most sensitive projection groups (KL when only they are int4): {top}")
    return lines + _layer_table(comp["layers"])


def _layer_table(layers: list[dict[str, Any]]) -> list[str]:
    w8a8 = any("act_scale" in e for e in layers)
    head = "| layer | bits | group | weight SQNR dB | output SQNR dB |"
    if w8a8:
        head += " activation scale | activation SQNR dB | SmoothQuant alpha |"
    lines = ["", head, "|" + "---|" * (head.count("|") - 1)]
    for e in layers:
        row = f"| {e['layer']} | {e['bits']} | {e['group']} | {e['weight_sqnr_db']} | {e.get('output_sqnr_db', '')} |"
        if w8a8:
            row += f" {fmt(e.get('act_scale', ''))} | {e.get('act_sqnr_db', '')} | {e.get('smooth_alpha', '')} |"
        lines.append(row)
    return lines


def _backends(r: dict[str, Any]) -> list[str]:
    if not r.get("backends"):
        return []
    lines = ["", "## Backends", ""]
    if r.get("validated_file"):
        lines += [f"Validation ran `{r['validated_file']}`.", ""]
    for b in r["backends"]:
        files = ", ".join(f"`{f}`" for f in b.get("files", ())) or "no files"
        lines.append(f"- **{b['backend']}** ({b['status']}): {b['note']}; {files}")
        for k, v in (b.get("details") or {}).items():
            lines.append(f"  - {k}: {fmt(v) if not isinstance(v, str) else f'`{v}`'}")
    return lines


def _loads(r: dict[str, Any]) -> list[str]:
    """Which runtime loads which file: a row per file, a column per runtime that is meant for one of them."""
    from slm_export.validation.loads import RUNTIME_NAMES, cell_text, loads_table

    if not r.get("runtime_loads"):
        return []
    files, runtimes, cells = loads_table(r["runtime_loads"])
    lines = ["", "## Runtimes that load these files", "",
             "Each file opened by each runtime meant for it, as an application would (a load, no generation); "
             "\"not checked here\": the runtime is not installed on the machine that validated, so nothing is "
             "claimed; \"-\": not that runtime's file.", "", "| file | " + " | ".join(runtimes) + " |",
             "|---|" + "---|" * len(runtimes)]
    for f in files:
        lines.append(f"| `{f}` | " + " | ".join(cell_text(cells.get((f, n))).replace("|", "\\|") for n in runtimes)
                     + " |")
    others = [n for n in RUNTIME_NAMES if n not in runtimes]
    return lines + ([f"\nNo file of this artifact is for {', '.join(others)}."] if others else [])


def _roofline(r: dict[str, Any]) -> list[str]:
    if not r.get("roofline"):
        return []
    return ["", "## Roofline (estimated from the target profile, not measured)", ""] + \
        [f"- {k}: {fmt(v)}" for k, v in r["roofline"].items()]


def _stages(r: dict[str, Any]) -> list[str]:
    lines = ["", "## Stages", "", "| stage | status | seconds | peak RSS MB (process high-water) | output bytes |",
             "|---|---|---|---|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} | "
                     f"{s.get('output_bytes', '')} |")
        if s.get("note"):
            lines.append(f"|  | {s['note']} | | | |")
    return lines


def junit_xml(report: dict[str, Any]) -> str:
    """JUnit XML for CI systems: one test case per goal, a failure for each goal missed."""
    from xml.sax.saxutils import quoteattr

    goals = report.get("goals", [])
    failed = sum(g["status"] != "PASS" for g in goals)
    suite = f"slm-export.{report['target']['id']}.{report['model']['name']}"
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<testsuites><testsuite name={quoteattr(suite)} tests="{len(goals)}" failures="{failed}">']
    for g in goals:
        case = f'  <testcase classname={quoteattr(suite)} name={quoteattr(g["metric"])}'
        detail = f"{g['metric']} = {g.get('value')} (goal {g['op']} {g['threshold']}); {g.get('where', '')}"
        if g["status"] == "PASS":
            lines.append(f"{case}><system-out>{_xml_text(detail)}</system-out></testcase>")
        else:
            lines.append(f"{case}><failure message={quoteattr(detail)}>{_xml_text(g.get('why', ''))}"
                         "</failure></testcase>")
    lines.append("</testsuite></testsuites>")
    return "\n".join(lines) + "\n"


def _xml_text(text: str) -> str:
    from xml.sax.saxutils import escape

    return escape(str(text))
