"""The reports a person reads: report.md's summary in its first 25 lines (verdict, artifact, accuracy, the target's
estimated speed beside every speed measured), and report.html rendered by a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from slm_export.report_html import render_html
from slm_export.report_md import render_markdown


def _report(**extra: object) -> dict:  # type: ignore[type-arg]
    host = "measured on host (x86_64, onnxruntime CPU, model.ort), greedy, KV cache, 64 tokens"
    emu = "measured under emulation (qemu-aarch64 -cpu cortex-a72, model.ort); emulated, not device speed"
    layers = [{"layer": f"model.layers.{i}.mlp.down_proj", "bits": 4, "group": 32, "weight_sqnr_db": 20.0 + i,
               "output_sqnr_db": 15.0 + i} for i in range(30)]
    report = {
        "schema_version": 1, "verdict": "PASS", "notes": [f"note {i}" for i in range(12)],
        "target": {"id": "rpi4b", "name": "Raspberry Pi 4", "origin": "built-in"},
        "model": {"name": "smollm2-135m"}, "plan": {"precision": "int4", "method": "awq-gptq", "group_size": 32},
        "metrics": {"perplexity_change_pct": {"value": 4.1, "unit": "%", "where": host},
                    "mean_kl": {"value": 0.047, "unit": "nats", "where": host},
                    "top1_agreement": {"value": 0.89, "unit": "", "where": host},
                    "decode_tokens_per_s_p50": {"value": 140.0, "unit": "tokens/s", "where": host},
                    "emulated_onnxruntime_decode_tokens_per_s_p50": {"value": 6.7, "unit": "tokens/s", "where": emu},
                    "artifact_bytes": {"value": 180_000_000, "unit": "bytes", "where": "artifact folder"}},
        "goals": [{"metric": f"goal_{i}", "op": "<=", "threshold": 1.0, "value": 0.5, "status": "PASS", "why": ""}
                  for i in range(4)],
        "roofline": {"rpi4b_decode_tokens_per_s_bound": 54.6, "rpi4b_prefill_tokens_per_s_bound": 900.0},
        "backends": [{"backend": "onnxruntime", "status": "done", "note": "ort format", "files": ["model.ort"]}],
        "validated_file": "model.ort", "stages": [], "versions": {},
        "compression": {"bits_per_weight": 4.6, "seconds": 60.0, "notes": [], "layers": layers, "budget": None},
    }
    report.update(extra)
    return report


def test_summary_fits_in_25_lines_and_names_the_estimate() -> None:
    lines = render_markdown(_report()).splitlines()
    head = "\n".join(lines[:25])
    assert "**Verdict: PASS**" in head
    assert "rpi4b decode, estimated | 54.6 tok/s" in head
    assert "decode, measured | 140 tok/s" in head
    assert "6.7 tok/s" in head
    assert "not device speed" in head
    assert "perplexity change | +4.10%" in head
    assert "180.0 MB" in head
    assert lines.index("## Notes") <= 25  # the long sections start after the summary


def test_failed_summary_says_how_many_goals_missed() -> None:
    report = _report(verdict="FAIL")
    report["goals"][1]["status"] = "FAIL"
    assert "**Verdict: FAIL**: 1 of 4 goals missed." in render_markdown(report)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is installed by scripts/setup.sh")
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(_report()))
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="verdict"' in html
    assert "Verdict: PASS" in html
    speeds = html[html.index('id="speeds"'):]
    assert speeds[:speeds.index("</svg>")].count("<rect") == 3  # the bound, the host and the emulated rate
    layers = html[html.index('id="layer-error"'):]
    assert layers[:layers.index("</svg>")].count("<rect") == 30
    assert "rpi4b bound (estimated)" in html
    assert "this host, measured" in html
    assert "onnxruntime emulated (not device speed)" in html
    shot = tmp_path / "shot.png"
    done = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1200,1600", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a page with text and bars, not a blank one


def test_an_export_writes_all_three_reports(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    from slm_export.cli import main

    out = tmp_path / "o"
    assert main(["--target", "host", "--model", str(tiny_models["llama"]), "--precision", "fp32", "--out", str(out),
                 "--eval-windows", "1", "--timing-tokens", "4", "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text().splitlines()
    assert "host decode, estimated" in "\n".join(md[:25])
    assert report["verdict"] in (out / "report.html").read_text()
    # energy per token in every report, with its source (no power sensor readable here: the nominal figure)
    energy = report["metrics"]["energy_per_token_j"]
    assert energy["source"] in ("measured", "estimated")
    assert energy["value"] > 0
    rate = report["metrics"]["decode_tokens_per_s_p50"]["value"]
    if energy["source"] == "estimated":
        assert energy["value"] == pytest.approx(10.0 / rate)  # nominal 10 W x 1 thread
    assert any(line.startswith("| energy,") or "energy," in line for line in md[:25])


def test_a_skipped_validation_still_estimates_energy_from_the_roofline(tmp_path: Path,
                                                                     tiny_models: dict[str, Path]) -> None:
    from slm_export.cli import main

    out = tmp_path / "o"
    assert main(["--target", "rpi4", "--model", str(tiny_models["llama"]), "--precision", "fp32", "--out", str(out),
                 "--no-validate"]) == 0  # an estimate alone sets no goals to judge
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "NOT VALIDATED"
    metrics = report["metrics"]
    energy = metrics["energy_per_token_j"]
    assert energy["source"] == "estimated"
    assert "roofline" in energy["where"]
    assert "6.1 W" in energy["where"]
