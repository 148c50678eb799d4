"""Reports: ``report.json`` (stable keys, schema version) and ``report.md`` for people."""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


@dataclass(frozen=True)
class Goal:
    """A threshold on one metric: ``metric op threshold``."""

    metric: str
    op: str
    threshold: Any
    why: str

    def evaluate(self, metrics: dict[str, Any]) -> dict[str, Any]:
        m = metrics.get(self.metric)
        if m is None:
            return {**self.as_dict(), "value": None, "status": "FAIL", "note": "metric was not measured"}
        value = m["value"]
        if not self._finite(value):  # None, NaN or Inf is a broken measurement: never a pass
            return {**self.as_dict(), "value": value, "where": m.get("where"), "status": "FAIL",
                    "note": "the value is not a finite number"}
        ok = _OPS[self.op](abs(value) if self.metric.endswith(("change_pct", "_pp")) else value, self.threshold)
        return {**self.as_dict(), "value": value, "where": m["where"], "status": "PASS" if ok else "FAIL"}

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold, "why": self.why}

    @staticmethod
    def _finite(value: Any) -> bool:
        """A bool or a finite number (NumPy's too); None, NaN, Inf and text are not."""
        import math

        if value is None or isinstance(value, str | bytes):
            return False
        try:
            return math.isfinite(float(value))
        except (TypeError, ValueError):
            return False


def default_goals(kind: str, precision: str, method: str | None = None, sparsity: str | None = None,
                  budget: float | None = None, pow2: bool = False) -> list[Goal]:
    """Goals an artifact must meet against the float32 reference."""
    if budget is not None:
        return [Goal("perplexity_change_pct", "<=", budget, "the accuracy budget given with --max-ppl-increase")]
    if sparsity:
        return []  # pruning without fine-tuning has no model-independent accuracy bound: report, don't judge
    if kind == "encoder":
        floor = 0.9999 if precision == "fp32" else 0.999
        return [Goal("embedding_cosine_min", ">=", floor, "sentence embeddings must match the reference")]
    if precision == "fp32":
        return [Goal("greedy_match", "==", True, "float32 must continue text exactly as PyTorch does"),
                Goal("perplexity_change_pct", "<=", 0.1, "float32 export must not change perplexity"),
                Goal("top1_agreement", ">=", 0.999, "next-token choice must agree with PyTorch")]
    if precision == "int8" and pow2:
        return [Goal("perplexity_change_pct", "<=", 15.0, "int8 with one power-of-two scale per tensor (weights and "
                     "activations) costs at most 15% perplexity")]
    if precision == "int8" and method in ("smoothquant", "dynamic"):
        return [Goal("perplexity_change_pct", "<=", 2.0, f"W8A8 ({method}) costs at most 2% perplexity")]
    if precision == "int8":
        return [Goal("perplexity_change_pct", "<=", 1.0, "int8 weights cost at most 1% perplexity")]
    if precision == "int4":
        return [Goal("perplexity_change_pct", "<=", 10.0, f"int4 with {method} costs at most 10% perplexity")]
    return [Goal("perplexity_change_pct", "<=", 1.0, f"{precision} rounding of weights costs at most 1% perplexity"),
            Goal("top1_agreement", ">=", 0.97, "next-token choice must mostly agree with PyTorch")]


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write both report files into ``out_dir``."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(render_markdown(report))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(r: dict[str, Any]) -> str:
    """The report for people: verdict first, then goals, metrics, roofline, stages, plan."""
    lines = [f"# slm-export report: {r['model']['name']} for {r['target']['id']}", ""]
    lines += [f"**Verdict: {r['verdict']}**", ""]
    for note in r.get("notes", []):
        lines.append(f"- {note}")
    if r.get("goals"):
        lines += ["", "## Goals", "", "| metric | goal | value | where | status |", "|---|---|---|---|---|"]
        for g in r["goals"]:
            lines.append(f"| {g['metric']} | {g['op']} {_fmt(g['threshold'])} | {_fmt(g.get('value'))} | "
                         f"{g.get('where', '')} | {g['status']} |")
    if r.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value | unit | where |", "|---|---|---|---|"]
        for name, m in r["metrics"].items():
            value = m["value"] if not isinstance(m["value"], str) else m["value"].replace("\n", " ")[:120]
            lines.append(f"| {name} | {_fmt(value)} | {m['unit']} | {m['where']} |")
    comp = r.get("compression")
    if comp:
        lines += ["", "## Compression", ""]
        bpw = comp["bits_per_weight"]
        if bpw is not None:
            lines.append(f"- mean bits per weight (linear layers and LM head, scales included): {bpw:.2f}")
        lines.append(f"- time: {comp['seconds']:.1f} s")
        if comp.get("calibration"):
            c = comp["calibration"]
            lines.append(f"- calibration: {c['samples']} x {c['seqlen']} tokens from {c['source']} "
                         f"(seed {c['seed']}, sha256 {c['sha256'][:16]})")
        lines += [f"- {n}" for n in comp.get("notes", [])]
        if comp.get("budget"):
            top = ", ".join(f"{u} ({kl:.3g})" for u, kl in comp["budget"]["sensitivity_kl"][:8])
            lines.append(f"- most sensitive projection groups (KL when only they are int4): {top}")
        w8a8 = any("act_scale" in e for e in comp["layers"])
        head = "| layer | bits | group | weight SQNR dB | output SQNR dB |"
        if w8a8:
            head += " activation scale | activation SQNR dB | SmoothQuant alpha |"
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for e in comp["layers"]:
            row = (f"| {e['layer']} | {e['bits']} | {e['group']} | {e['weight_sqnr_db']} | "
                   f"{e.get('output_sqnr_db', '')} |")
            if w8a8:
                row += f" {_fmt(e.get('act_scale', ''))} | {e.get('act_sqnr_db', '')} | {e.get('smooth_alpha', '')} |"
            lines.append(row)
    if r.get("backends"):
        lines += ["", "## Backends", ""]
        if r.get("validated_file"):
            lines.append(f"Validation ran `{r['validated_file']}`.")
            lines.append("")
        for b in r["backends"]:
            files = ", ".join(f"`{f}`" for f in b.get("files", ())) or "no files"
            lines.append(f"- **{b['backend']}** ({b['status']}): {b['note']}; {files}")
            for k, v in (b.get("details") or {}).items():
                lines.append(f"  - {k}: {_fmt(v) if not isinstance(v, str) else f'`{v}`'}")
    if r.get("roofline"):
        lines += ["", "## Roofline (estimated from the target profile, not measured)", ""]
        for k, v in r["roofline"].items():
            lines.append(f"- {k}: {_fmt(v)}")
    lines += ["", "## Stages", "", "| stage | status | seconds | peak RSS MB (process high-water) | output bytes |",
              "|---|---|---|---|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.2f} | {s['peak_rss_mb']:.0f} | "
                     f"{s.get('output_bytes', '')} |")
        if s.get("note"):
            lines.append(f"|  | {s['note']} | | | |")
    lines += ["", "## Plan", "", "```json", json.dumps(r["plan"], indent=2), "```", ""]
    lines += ["## Versions", ""] + [f"- {k}: {v}" for k, v in r["versions"].items()] + [""]
    return "\n".join(lines)


def load_goals(path: str | Path) -> list[Goal]:
    """Goals from a TOML file, replacing the defaults: one table per metric with ``max``, ``min`` or
    ``equals`` (and an optional ``why``), e.g. ``[perplexity_change_pct]`` / ``max = 5.0``, or
    ``[device_decode_tokens_per_s_p50]`` / ``min = 10``. ``*_change_pct`` and ``*_pp`` metrics compare
    their magnitude, so ``max`` is a maximum degradation either way."""
    import tomllib

    from slm_export.errors import ConfigError

    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--goals {path}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--goals {path}: not valid TOML ({exc})") from None
    goals = []
    ops = {"max": "<=", "min": ">=", "equals": "=="}
    for metric, spec in data.get("goals", data).items():
        if not isinstance(spec, dict) or not set(spec) - {"why"} or set(spec) - {"why", *ops}:
            raise ConfigError(f"--goals {path}: [{metric}] needs one of max, min or equals (and optionally why)")
        for key, op in ops.items():
            if key in spec:
                if not isinstance(spec[key], bool | int | float):
                    raise ConfigError(f"--goals {path}: [{metric}] {key} must be a number or true/false")
                goals.append(Goal(metric, op, spec[key], str(spec.get("why", f"from {Path(path).name}"))))
    if not goals:
        raise ConfigError(f"--goals {path}: no goals in it")
    return goals


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
