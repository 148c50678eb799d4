#!/usr/bin/env python
"""Issue-5 figures: smollm2-135m for rpi4b validated over SSH on a loopback "device" (a real OpenSSH
server on 127.0.0.1 with throwaway keys and a device Python holding only NumPy and ONNX Runtime), beside
the host runner's figures for the same file, in one run.

For float32 the device's tokens must be identical to the host's (same file, same runtime, same CPU); for
int4 within quantization noise. The overhead is the device run's wall time beyond the runner's own time
(upload, ssh, start-up). Each export runs through the CLI's plan (``slm_export.export``: ``make_plan`` then
``run``) in a fresh process, validated on the host and on the device as ``--device`` makes the CLI do.

Usage: python scripts/bench_device.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from slm_export.bench import export_report, in_fresh_process, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.sshd import start_sshd  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from slm_export.validation.validate import ValidationSettings

    checks: dict[str, bool] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sshd = start_sshd(Path(tmp) / "sshd")
        try:
            for precision in ("fp32", "int4"):
                out = Path(tmp) / precision
                settings = ValidationSettings(threads=args.threads, device=sshd.url(), identity=str(sshd.key),
                                              known_hosts=str(sshd.known_hosts))
                t = time.perf_counter()
                try:
                    r = in_fresh_process(export_report, "smollm2-135m", "rpi4", out, precision, emulate="off",
                                         settings=settings)
                except Exception as exc:
                    raise SystemExit(f"{precision} failed: {type(exc).__name__}: {exc}") from None
                wall = time.perf_counter() - t
                m = r["metrics"]
                dev = r["device"][0]
                v = {k: m[k]["value"] for k in ("perplexity_change_pct", "device_perplexity_change_pct",
                                                "device_perplexity_change_vs_host_pp", "device_agreement_with_host",
                                                "device_greedy_equals_host")}
                rows.append([precision, dev.get("file"), f"{v['perplexity_change_pct']:+.3f}%",
                             f"{v['device_perplexity_change_pct']:+.3f}%",
                             f"{v['device_perplexity_change_vs_host_pp']:+.4f}",
                             f"{v['device_agreement_with_host']:.4f}", v["device_greedy_equals_host"],
                             dev.get("wall_s"), dev.get("overhead_s"), f"{wall:.0f}"])
                print(f"  device: {m['device_perplexity']['where']}", file=sys.stderr)
                if precision == "fp32":
                    checks["fp32: device tokens identical to the host's (top-1 and greedy)"] = \
                        v["device_agreement_with_host"] == 1.0 and v["device_greedy_equals_host"] is True
                else:
                    checks["int4: device within 0.5 pp of the host"] = abs(v["device_perplexity_change_vs_host_pp"]) \
                        <= 0.5
                checks[f"{precision}: overhead reported"] = dev.get("overhead_s") is not None
        finally:
            sshd.stop()
    print("## smollm2-135m for rpi4b over SSH to a loopback device, one run")
    print_table(["precision", "device file", "host ppl change", "device ppl change", "device - host (pp)",
                 "top-1 = host", "greedy = host", "device run s", "overhead s", "export wall s"], rows)
    print()
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
