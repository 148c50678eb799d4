"""Energy per token: the power sensors the runner reads (fake sysfs trees of RAPL and a Jetson's INA3221, both
of its drivers), and the report's choice of source, measured before estimated."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from slm_export.energy import NOMINAL_WATTS_PER_THREAD, energy_metrics
from slm_export.runner.power import PowerMeter


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def jetson_iio(root: Path, rails: dict[str, int]) -> Path:
    """L4T 32 (TX2): ``ina3221x`` iio devices, rails in mW with their names."""
    dev = root / "bus/i2c/drivers/ina3221x/0-0041/iio:device1"
    for n, (name, mw) in enumerate(rails.items()):
        _write(dev / f"rail_name_{n}", name + "\n")
        _write(dev / f"in_power{n}_input", f"{mw}\n")
    return root


def test_rapl_counter_difference_over_time(tmp_path: Path) -> None:
    pkg = tmp_path / "class/powercap/intel-rapl:0"
    _write(pkg / "name", "package-0\n")
    _write(pkg / "energy_uj", "1000000\n")
    _write(pkg / "max_energy_range_uj", "262143328850\n")
    _write(tmp_path / "class/powercap/intel-rapl:0:0/energy_uj", "5\n")  # a sub-domain: not added
    meter = PowerMeter(tmp_path)
    assert meter.available
    assert meter.kind == "rapl"
    meter.start()
    time.sleep(0.2)
    _write(pkg / "energy_uj", "3000000\n")  # 2 J later
    got = meter.stop()
    assert got is not None
    assert got["watts"] == pytest.approx(2.0 / got["seconds"])
    assert 5.0 < got["watts"] < 10.5  # 2 J over about 0.2 s
    assert "intel-rapl:0 (package-0)" in got["source"]


def test_rapl_wraps_and_a_still_counter_is_no_reading(tmp_path: Path) -> None:
    pkg = tmp_path / "class/powercap/intel-rapl:0"
    _write(pkg / "energy_uj", "999000\n")
    _write(pkg / "max_energy_range_uj", "1000000\n")
    meter = PowerMeter(tmp_path)
    meter.start()
    _write(pkg / "energy_uj", "1000\n")  # wrapped: 2000 uJ later
    got = meter.stop()
    assert got is not None
    assert got["watts"] * got["seconds"] == pytest.approx(0.002)
    meter.start()  # the counter does not move: no figure rather than 0 W
    assert meter.stop() is None


def test_jetson_iio_rails_take_vdd_in_alone(tmp_path: Path) -> None:
    root = jetson_iio(tmp_path, {"VDD_IN": 5200, "VDD_SYS_CPU": 1800, "VDD_SYS_DDR": 900})
    meter = PowerMeter(root, interval_s=0.005)
    assert meter.available
    assert meter.kind == "ina3221"
    meter.start()
    time.sleep(0.05)
    got = meter.stop()
    assert got is not None
    assert got["watts"] == pytest.approx(5.2)  # the module's input rail, not the sum of its parts
    assert "VDD_IN" in got["source"]
    assert "VDD_SYS_CPU" not in got["source"]
    assert got["samples"] >= 2


def test_jetson_rails_summed_without_vdd_in_and_samples_follow_the_load(tmp_path: Path) -> None:
    root = jetson_iio(tmp_path, {"VDD_SYS_GPU": 1000, "VDD_SYS_CPU": 2000})
    cpu = root / "bus/i2c/drivers/ina3221x/0-0041/iio:device1/in_power1_input"
    meter = PowerMeter(root, interval_s=0.005)
    meter.start()
    time.sleep(0.05)
    cpu.write_text("4000\n")  # the load rises half way: the average lies between 3 W and 5 W
    time.sleep(0.05)
    got = meter.stop()
    assert got is not None
    assert 3.0 < got["watts"] < 5.0
    assert "VDD_SYS_GPU + VDD_SYS_CPU" in got["source"]


def test_hwmon_ina3221_volts_times_amps(tmp_path: Path) -> None:
    mon = tmp_path / "class/hwmon/hwmon3"
    _write(mon / "name", "ina3221\n")
    _write(mon / "in1_label", "VDD_IN\n")
    _write(mon / "in1_input", "5000\n")  # mV
    _write(mon / "curr1_input", "1500\n")  # mA
    _write(mon / "in2_label", "VDD_CPU_GPU_CV\n")
    _write(mon / "in2_input", "5000\n")
    _write(mon / "curr2_input", "300\n")
    meter = PowerMeter(tmp_path, interval_s=0.005)
    meter.start()
    time.sleep(0.03)
    got = meter.stop()
    assert got is not None
    assert got["watts"] == pytest.approx(7.5)


def test_no_sensor_or_unreadable_sensor(tmp_path: Path) -> None:
    assert not PowerMeter(tmp_path).available
    pkg = tmp_path / "class/powercap/intel-rapl:0"
    _write(pkg / "energy_uj", "not a number\n")
    assert not PowerMeter(tmp_path).available


def _m(value: float, where: str = "somewhere") -> dict:
    return {"value": value, "unit": "", "where": where}


HOST = SimpleNamespace(id="host", power_w=0.0)
PI = SimpleNamespace(id="rpi4b", power_w=6.1)


def test_energy_sources_in_order() -> None:
    # a device's measured power and time
    got = energy_metrics(PI, {"device_decode_tokens_per_s_p50": _m(10.0), "device_power_w": _m(5.0, "ina3221")},
                         {}, "decoder")["energy_per_token_j"]
    assert got["value"] == pytest.approx(0.5)
    assert got["source"] == "measured"
    # the device's time, the profile's power
    got = energy_metrics(PI, {"device_decode_tokens_per_s_p50": _m(10.0)}, {}, "decoder")["energy_per_token_j"]
    assert got["value"] == pytest.approx(0.61)
    assert got["source"] == "estimated"
    assert "6.1 W" in got["where"]
    # no device: the roofline, never the host's or an emulator's time
    got = energy_metrics(PI, {"decode_tokens_per_s_p50": _m(100.0), "emulated_rpi4b_decode_tokens_per_s_p50":
                              _m(1.0)}, {"rpi4b_decode_tokens_per_s_bound": 20.0}, "decoder")["energy_per_token_j"]
    assert got["value"] == pytest.approx(6.1 / 20.0)
    assert "roofline" in got["where"]
    # the host: its sensor where read, else nominal per thread
    got = energy_metrics(HOST, {"decode_tokens_per_s_p50": _m(50.0), "power_w": _m(30.0, "RAPL")}, {},
                         "decoder")["energy_per_token_j"]
    assert got["value"] == pytest.approx(0.6)
    assert got["source"] == "measured"
    got = energy_metrics(HOST, {"decode_tokens_per_s_p50": _m(50.0), "threads": _m(2)}, {},
                         "decoder")["energy_per_token_j"]
    assert got["value"] == pytest.approx(2 * NOMINAL_WATTS_PER_THREAD / 50.0)
    assert "nominal" in got["where"]
    got = energy_metrics(HOST, {"latency_ms_p50": _m(4.0), "threads": _m(1)}, {}, "encoder")
    assert got["energy_per_inference_j"]["value"] == pytest.approx(NOMINAL_WATTS_PER_THREAD * 0.004)
    assert got["energy_per_inference_j"]["unit"] == "J/inference"


def test_meter_thread_stops(tmp_path: Path) -> None:
    meter = PowerMeter(jetson_iio(tmp_path, {"VDD_IN": 1000}), interval_s=0.005)
    before = threading.active_count()
    meter.start()
    meter.stop()
    assert threading.active_count() == before
