"""Energy per token (decoders) or per inference (encoders): power times the time one takes, with its source.

The best source available wins, and the metric's ``where`` says which it was:

1. measured: a power sensor read where the artifact ran (RAPL on x86 Linux, a Jetson's INA3221 rails;
   ``runner/power.py``), times the time per token measured in the same runs;
2. estimated from the device's measured time: the target profile's power figure times the time per token
   the device (over SSH) measured;
3. estimated from the host's measured time (host target only): no sensor was readable, so a nominal power
   per thread in use (``NOMINAL_WATTS_PER_THREAD``) times the host's measured time;
4. estimated from the roofline: the profile's power times the profile's roofline bound time per token, where
   no device ran (an emulator's time is the emulator's, not the device's, so it is never used).
"""

from __future__ import annotations

import os
from typing import Any

# A busy x86 or ARM server core under a matmul load draws roughly 5 to 15 W of package power; 10 W per thread
# in use stands in where the host has neither a readable sensor nor a profile figure, and is labelled nominal.
NOMINAL_WATTS_PER_THREAD = 10.0


def _metric(value: float, where: str, source: str, unit: str = "J/token") -> dict[str, Any]:
    return {"value": value, "unit": unit, "where": where, "source": source}


def energy_metrics(profile: Any, metrics: dict[str, Any], roof: dict[str, Any], kind: str) -> dict[str, Any]:
    """``energy_per_token_j`` (decoders) or ``energy_per_inference_j`` (encoders), or nothing when no time
    per token exists (validation skipped and no roofline)."""
    if kind != "decoder":
        return _encoder(profile, metrics)
    watts = float(getattr(profile, "power_w", 0.0) or 0.0)
    device_rate = _value(metrics, "device_decode_tokens_per_s_p50")
    device_power = _value(metrics, "device_power_w")
    if device_rate and device_power:
        src = metrics["device_power_w"]["where"]
        return {"energy_per_token_j": _metric(
            device_power / device_rate, f"measured on the device: {device_power:.2f} W average ({src}) over "
            f"{1000 / device_rate:.2f} ms per decoded token", "measured")}
    if device_rate and watts:
        return {"energy_per_token_j": _metric(
            watts / device_rate, f"estimated: the {profile.id} profile's {watts:g} W times the device's measured "
            f"{1000 / device_rate:.2f} ms per decoded token (no power sensor read there)", "estimated")}
    host = _host(profile, metrics, "decode_tokens_per_s_p50", "per decoded token", lambda r: 1.0 / r)
    if host:
        return {"energy_per_token_j": host}
    bound = roof.get(f"{profile.id}_decode_tokens_per_s_bound")
    if not bound:
        return {}
    if watts:
        power = f"the {profile.id} profile's {watts:g} W"
    else:  # the host, not validated: its nominal figure over every core
        cores = os.cpu_count() or 1
        watts = NOMINAL_WATTS_PER_THREAD * cores
        power = f"nominal {NOMINAL_WATTS_PER_THREAD:g} W per thread x {cores} threads"
    return {"energy_per_token_j": _metric(
        watts / bound, f"estimated: {power} times the roofline bound's {1000 / bound:.2f} ms per token (no "
        "timed run on the target: a lower bound on time, so on energy too)", "estimated")}


def _encoder(profile: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    got = _host(profile, metrics, "latency_ms_p50", "per inference", lambda ms: ms / 1000.0)
    return {"energy_per_inference_j": {**got, "unit": "J/inference"}} if got else {}


def _host(profile: Any, metrics: dict[str, Any], name: str, per: str, seconds_of: Any) -> dict[str, Any] | None:
    """The host's own run: its measured power where a sensor was read, else the profile's figure (targets whose
    validation ran on the host stand in for nothing: the host target only), else the nominal one."""
    if profile.id != "host" or not _value(metrics, name):
        return None
    seconds = seconds_of(metrics[name]["value"])
    power = _value(metrics, "power_w")
    if power:
        return _metric(power * seconds, f"measured on host: {power:.2f} W average ({metrics['power_w']['where']}) "
                       f"over {1000 * seconds:.2f} ms {per}", "measured")
    watts = float(getattr(profile, "power_w", 0.0) or 0.0)
    if watts:
        return _metric(watts * seconds, f"estimated: the host profile's {watts:g} W times the measured "
                       f"{1000 * seconds:.2f} ms {per}", "estimated")
    threads = int(_value(metrics, "threads") or 1)
    nominal = NOMINAL_WATTS_PER_THREAD * threads
    return _metric(nominal * seconds, f"estimated: nominal {NOMINAL_WATTS_PER_THREAD:g} W per thread x {threads} "
                   f"thread(s) (no power sensor readable on this host) times the measured {1000 * seconds:.2f} ms "
                   f"{per}", "estimated")


def _value(metrics: dict[str, Any], name: str) -> float | None:
    m = metrics.get(name)
    v = m.get("value") if isinstance(m, dict) else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v > 0 else None
