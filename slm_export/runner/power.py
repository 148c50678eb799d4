"""Power sensors where the artifact runs, read around the timed runs: standard library only (the runner's far
side has NumPy and the runtime, nothing else).

Sources, the first one found under the sysfs root wins:

- RAPL (x86 Linux, ``class/powercap/intel-rapl:N/energy_uj``): a cumulative energy counter per package, read
  before and after; the difference over the time is the average power. The counter wraps at
  ``max_energy_range_uj``.
- INA3221 (Jetson): the board's power monitor, instantaneous rails. The L4T 32 driver
  (``bus/i2c/drivers/ina3221x/*/iio:device*/in_power{N}_input`` in mW, ``rail_name_{N}``) or the hwmon driver
  of later releases (``class/hwmon/hwmon*`` named ``ina3221``: ``in{N}_input`` mV, ``curr{N}_input`` mA,
  ``in{N}_label``). Sampled in a thread while the runs go; the average of the samples is the power. The
  ``VDD_IN`` rail, where it exists, is the whole module's input and is taken alone; otherwise the rails are
  summed (and the source says which).
- Any other hwmon ``power{N}_input`` (microwatts), sampled the same way.

A sensor that cannot be read (permissions, a counter that did not move) gives no figure, never a guess.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _text(path: Path, default: str) -> str:
    """A sysfs label, or ``default`` where there is none (or it cannot be read)."""
    try:
        return path.read_text().strip()
    except OSError:
        return default


def _scaled(path: Path, per_watt: float) -> float | None:
    """A sensor reading in watts: its integer value over ``per_watt`` (mW: 1e3, microwatts: 1e6)."""
    v = _read_int(path)
    return None if v is None else v / per_watt


def _rapl(root: Path) -> list[tuple[str, Path, int]]:
    """Top-level RAPL domains (packages): name, counter file, wrap range in microjoules."""
    out = []
    for d in sorted((root / "class/powercap").glob("intel-rapl:*")):
        if d.name.count(":") != 1:  # intel-rapl:0:0 is a sub-domain (core, uncore, dram) of package 0
            continue
        counter = d / "energy_uj"
        if _read_int(counter) is None:
            continue
        name = _text(d / "name", d.name)
        out.append((f"{d.name} ({name})", counter, _read_int(d / "max_energy_range_uj") or 0))
    return out


def _ina3221_iio(root: Path) -> list[tuple[str, Callable[[], float | None]]]:
    rails = []
    for dev in sorted((root / "bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for p in sorted(dev.glob("in_power*_input")):
            n = p.name[len("in_power"):-len("_input")]
            name = _text(dev / f"rail_name_{n}", f"{dev.parent.name} channel {n}")
            rails.append((name, lambda p=p: _scaled(p, 1e3)))
    return rails


def _hwmon(root: Path) -> tuple[list[tuple[str, Callable[[], float | None]]], str]:
    """INA3221 rails from hwmon (V x I), else any hwmon power sensor (microwatts)."""
    ina, other = [], []
    for mon in sorted((root / "class/hwmon").glob("hwmon*")):
        chip = _text(mon / "name", mon.name)
        if chip.startswith("ina3221"):
            for volt in sorted(mon.glob("in*_input")):
                n = volt.name[2:-len("_input")]
                curr = mon / f"curr{n}_input"
                if not curr.exists():
                    continue
                name = _text(mon / f"in{n}_label", f"{chip} channel {n}")
                ina.append((name, lambda v=volt, c=curr: _vi(v, c)))
        for p in sorted(mon.glob("power*_input")):
            other.append((f"{chip} {p.name}", lambda p=p: _scaled(p, 1e6)))
    return (ina, "ina3221") if ina else (other, "hwmon")


def _vi(volt: Path, curr: Path) -> float | None:
    v, i = _read_int(volt), _read_int(curr)
    return None if v is None or i is None else v * i / 1e6  # mV x mA = microwatts; in watts


def _pick_rails(rails: list[tuple[str, Callable[[], float | None]]]) -> list[tuple[str, Callable[[], float | None]]]:
    whole = [r for r in rails if r[0].upper() in ("VDD_IN", "VIN_SYS_5V0")]  # the module's own input rail
    return whole[:1] or rails


class PowerMeter:
    """``start()`` before the timed runs, ``stop()`` after: the average power over them and its source, or
    None where this machine exposes no readable sensor."""

    def __init__(self, root: str | Path = "/sys", interval_s: float = 0.02) -> None:
        self.root = Path(root)
        self.interval_s = interval_s
        self.rapl = _rapl(self.root)
        rails, kind = ([], "")
        if not self.rapl:
            rails = _ina3221_iio(self.root)
            kind = "ina3221"
            if not rails:
                rails, kind = _hwmon(self.root)
        self.rails = _pick_rails([r for r in rails if r[1]() is not None])
        self.kind = "rapl" if self.rapl else kind
        self._t0 = 0.0
        self._start: list[int | None] = []
        self._samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return bool(self.rapl or self.rails)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = [_read_int(c) for _, c, _ in self.rapl]
        if self.rails:
            self._samples.clear()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while True:
            values = [f() for _, f in self.rails]
            if all(v is not None for v in values):
                self._samples.append(sum(values))  # type: ignore[arg-type]
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> dict[str, Any] | None:
        seconds = time.perf_counter() - self._t0
        if self.rapl:
            joules = 0.0
            for (_, counter, wrap), before in zip(self.rapl, self._start, strict=True):
                after = _read_int(counter)
                if before is None or after is None:
                    return None
                delta = after - before if after >= before else after + wrap - before
                joules += delta / 1e6
            if joules <= 0 or seconds <= 0:
                return None  # a counter that did not move is not a reading
            names = ", ".join(n for n, _, _ in self.rapl)
            return {"watts": joules / seconds, "seconds": seconds, "kind": "rapl",
                    "source": f"RAPL package energy counters ({names}), read before and after"}
        if not self.rails or self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        if not self._samples:
            return None
        names = " + ".join(n for n, _ in self.rails)
        return {"watts": sum(self._samples) / len(self._samples), "seconds": seconds, "kind": self.kind,
                "samples": len(self._samples),
                "source": f"{self.kind} rails {names}, {len(self._samples)} samples over the timed runs"}
