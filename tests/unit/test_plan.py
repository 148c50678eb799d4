"""The planner as a table: (target, options) -> (decisions, notes, refusal). Every default a profile implies,
every refusal, and every note the user reads about them, in one place."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from slm_export.errors import ConfigError, SlmExportError, UnsupportedByTarget
from slm_export.planning import IGNORED, make_plan
from slm_export.targets import TargetProfile, get_target

M = "smollm2-135m"
# Profiles a user writes to get a GGUF (no built-in one names llamacpp): the host's, with these backends.
GGUF_PROFILES = {"host-llamacpp": '["llamacpp"]', "host-gguf": '["onnxruntime", "llamacpp"]'}


def _profile(target: str, tmp_path: Path) -> TargetProfile:
    if target not in GGUF_PROFILES:
        return get_target(target)
    text = (resources.files("slm_export.targets") / "profiles" / "host.toml").read_text()
    text = text.replace('id = "host"', f'id = "{target}"').replace('order = ["onnxruntime"]',
                                                                 f"order = {GGUF_PROFILES[target]}")
    text = "\n".join("aliases = []" if line.startswith("aliases =") else line for line in text.splitlines())
    path = tmp_path / f"{target}.toml"
    path.write_text(text + "\n")
    return get_target(target_file=path)

# (target, precision, options, decisions the plan must hold, words one note must contain)
CASES: list[tuple[str, str | None, dict[str, Any], dict[str, Any], str | None]] = [
    ("host", None, {}, {"precision": "fp32", "method": None, "lm_head_bits": 0, "emulate": "off"}, None),
    ("host", "int4", {}, {"method": "awq-gptq", "lm_head_bits": 4, "lm_head_hot": 0.15, "symmetric": False,
                          "accuracy_level": 4, "group_size": 32, "calib_samples": 64}, "15% of its rows"),
    ("host", "int4", {"method": "rtn"}, {"lm_head_bits": 8, "lm_head_hot": 0.0}, "quantized to int8 as well"),
    ("host", "int4", {"symmetric": True}, {"signed_scales": True}, "(-8) reaches that end"),
    ("host", "int8", {}, {"method": "rtn", "lm_head_bits": 8}, "activations stay float"),
    ("host", "int8", {"method": "smoothquant"}, {"rotate": 128, "observer": "minmax", "lm_head_bits": 0}, None),
    ("host", None, {"max_ppl_increase": 5.0}, {"precision": "int4", "calib_holdout": True}, None),
    ("rpi4b", None, {}, {"precision": "int4", "method": "awq-gptq", "accuracy_level": 1, "lm_head_bits": 8,
                         "lm_head_hot": 0.0}, "no dot-product instructions"),
    ("android-arm64", None, {}, {"precision": "int4", "symmetric": True, "signed_scales": False},
     "XNNPACK int4/int8 GEMMs"),
    ("a100", None, {}, {"precision": "fp16"}, "stored at half width"),
    ("a100", "int8", {}, {"method": "smoothquant", "rotate": 128}, None),
    ("fpga-zcu104", None, {}, {"precision": "int8", "method": "smoothquant", "pow2_scales": True},
     "power-of-two"),
    ("fpga-zcu104", None, {}, {"static_shapes": True}, "needs static shapes"),
    ("a100", "fp16", {"sparsity": "2:4"}, {"sparsity": "2:4", "sparsity_method": "sparsegpt"},
     "trtexec --sparsity=enable"),
    ("host", None, {"group_size": 64}, {"group_size": 64}, IGNORED + "--group-size applies to weight-only"),
    ("host", "int4", {"method": "rtn", "calib_samples": 8}, {}, IGNORED + "--calib-samples applies to methods"),
    ("host", "int8", {"method": "dynamic", "group_size": 64}, {}, IGNORED + "--group-size"),
    ("host", "fp32", {"sparsity": "2:4", "sparsity_ratio": 0.3}, {}, IGNORED + "--sparsity-ratio"),
    ("host", "int4", {"damp": 0.05}, {"damp": 0.05}, None),
    ("host", "int4", {"method": "rtn", "damp": 0.05}, {}, IGNORED + "--damp applies to methods that round with GPTQ"),
    # llama.cpp: Q4_0's signed d, so symmetric int4 takes signed scales; Q8_0 is symmetric, so int8 is by default;
    # asymmetric int4 is Q4_1, kept; the head stays float unless asked (ONNX Runtime is not the first backend)
    ("host-llamacpp", "int4", {"symmetric": True}, {"signed_scales": True, "lm_head_bits": 0, "group_size": 32},
     "llama.cpp's Q4_0 grid"),
    ("host-llamacpp", "int8", {}, {"symmetric": True, "method": "rtn"}, "GGUF's Q8_0 blocks"),
    ("host-llamacpp", "int4", {"method": "rtn"}, {"symmetric": False, "lm_head_bits": 0}, None),
    ("host-llamacpp", "int4", {"method": "rtn", "group_size": 64}, {"group_size": 64}, None),
    # a secondary llamacpp backend: the ONNX Runtime artifact is still built, the note says why no GGUF
    ("host-gguf", "int4", {"method": "rtn"}, {"lm_head_bits": 8, "symmetric": False},
     "no GGUF for llamacpp, whose blocks cannot hold these weights: asymmetric int8 LM head"),
    ("host-gguf", "int4", {"method": "rtn", "symmetric": True}, {"signed_scales": True, "lm_head_bits": 8}, None),
]


@pytest.mark.parametrize(("target", "precision", "options", "decisions", "note"), CASES)
def test_decisions_and_notes(target: str, precision: str | None, options: dict[str, Any], decisions: dict[str, Any],
                             note: str | None, tmp_path: Path) -> None:
    plan = make_plan(_profile(target, tmp_path), M, tmp_path / "o", precision, **options)
    got = {k: getattr(plan, k) for k in decisions}
    assert got == decisions
    if note:
        assert any(note in n for n in plan.notes), plan.notes


REFUSALS: list[tuple[str, str | None, dict[str, Any], type[SlmExportError], str]] = [
    ("host", "fp32", {"method": "gptq"}, ConfigError, "--method applies to int8 and int4"),
    ("host", "fp32", {"tune_epochs": 1}, ConfigError, "int8 or int4"),
    ("host", None, {"tune_epochs": 1, "max_ppl_increase": 5.0}, ConfigError, "do not combine"),
    ("host", "int8", {"max_ppl_increase": 5.0}, ConfigError, "mixes int4 and int8"),
    ("host", "int4", {"group_size": 48}, ConfigError, "--group-size must be a power of two >= 16"),
    ("host", "int4", {"calib_samples": 0}, ConfigError, "--calib-samples must be at least 1"),
    ("host", "int4", {"seed": -1}, ConfigError, "--seed must be at least 0"),
    ("host", "int4", {"lm_head_hot": 1.0}, ConfigError, "--lm-head-hot must be in [0, 1)"),
    ("host", "int4", {"lm_head_bits": 8, "lm_head_hot": 0.1}, ConfigError, "use it with --lm-head-bits 4"),
    ("rpi4b", "int4", {"lm_head_bits": 4, "lm_head_hot": 0.1}, ConfigError, "rpi4b also builds for tvm"),
    ("android-arm64", "int4", {"signed_scales": True}, ConfigError, "also builds for executorch"),
    ("host", "int4", {"method": "smoothquant"}, ConfigError, "use --precision int8"),
    ("host", "int4", {"rotate": 64}, ConfigError, "for int8 activations"),
    ("host", "int8", {"method": "smoothquant", "rotate": 24}, ConfigError, "--rotate must be a power of two"),
    ("host", "int8", {"method": "smoothquant", "smooth_alpha": 1.5}, ConfigError, "--smooth-alpha must be in"),
    ("host", "int8", {"method": "smoothquant", "tune_epochs": 1}, ConfigError, "not for W8A8"),
    ("host", "int4", {"tune_epochs": 101}, ConfigError, "between 0 and 100"),
    ("host", None, {"max_ppl_increase": 0.0}, ConfigError, "--max-ppl-increase must be in (0, 1000)"),
    ("host", "fp32", {"sparsity": "3:2"}, ConfigError, "need 0 < N < M"),
    ("host", "int4", {"damp": 0.0}, ConfigError, "--damp must be in (0, 1)"),
    ("host", "fp32", {"emulate": "sometimes"}, ConfigError, "emulate must be on, auto or off"),
    ("host", "fp32", {"emulate": "on"}, UnsupportedByTarget, "runs aarch64 code under QEMU"),
    ("jetson-tx2", "int8", {}, UnsupportedByTarget, "Supported on jetson-tx2: fp32, fp16"),
    ("fpga-zcu104", None, {"method": "rtn"}, UnsupportedByTarget, "power-of-two"),
    ("host", "fp32", {"no_such_option": 1}, ConfigError, "unknown option(s): no_such_option"),
    # llamacpp as the plan's own backend: what no GGUF block holds is refused before any work, with the reason
    ("host-llamacpp", "int4", {"method": "rtn", "group_size": 16}, ConfigError, "must be a multiple of 32"),
    ("host-llamacpp", "int8", {"method": "smoothquant"}, ConfigError, "(W8A8)"),
    ("host-llamacpp", "int8", {"method": "dynamic"}, ConfigError, "(W8A8)"),
    ("host-llamacpp", "int8", {"symmetric": False}, ConfigError, "Q8_0, GGUF's int8 block, is symmetric"),
    ("host-llamacpp", "int4", {"method": "rtn", "lm_head_bits": 8}, ConfigError, "asymmetric int8 LM head"),
    ("host-llamacpp", "int4", {"method": "rtn", "lm_head_bits": 4, "lm_head_hot": 0.1}, ConfigError,
     "also builds for llamacpp"),
    ("host-llamacpp", None, {"max_ppl_increase": 5.0}, ConfigError, "Q8_0 is symmetric"),
]


@pytest.mark.parametrize(("target", "precision", "options", "error", "words"), REFUSALS)
def test_refusals(target: str, precision: str | None, options: dict[str, Any], error: type[SlmExportError],
                  words: str, tmp_path: Path) -> None:
    with pytest.raises(error) as caught:
        make_plan(_profile(target, tmp_path), M, tmp_path / "o", precision, **options)
    assert words in str(caught.value)


def test_report_form_round_trips(tmp_path: Path) -> None:
    """The report's flat plan reads back into the same plan (``validate`` relies on it), and an older report
    without the newer fields still reads."""
    from slm_export.plan import Plan

    plan = make_plan(get_target("rpi4b"), M, tmp_path / "o", "int4", calib_samples=8)
    assert Plan.from_dict(plan.to_dict()) == plan
    older = {k: v for k, v in plan.to_dict().items() if k not in ("force", "calib_holdout", "damp", "act_order")}
    assert Plan.from_dict(older).calib_samples == 8


def test_every_option_is_a_flag_declared_once() -> None:
    """Each declared option has exactly one CLI flag with its declaration's help."""
    from slm_export.cli import _parser
    from slm_export.options import declared
    from slm_export.plan import Plan

    export = next(a for a in _parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
                  if any(o.option_strings == ["--model", "-m"] for o in a._actions))
    flags = {s: a for a in export._actions for s in a.option_strings}
    for f, option in declared(Plan):
        action = flags[option.flag_for(f.name)]
        assert action.dest == f.name
        assert option.help.split("%")[0][:30] in (action.help or "")


def test_a_flag_declared_once_reaches_its_algorithm(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """--damp was added by its declaration alone (docs/design.md shows the diff): the plan carries it to GPTQ,
    whose rounding it changes."""
    from slm_export.calibration.compress import compress
    from slm_export.models import load_model

    model = load_model(str(tiny_models["llama"]))
    codes = []
    for damp in (0.01, 0.5):
        plan = make_plan(get_target("host"), str(tiny_models["llama"]), tmp_path / "o", "int4", method="gptq",
                         calib_samples=4, calib_seqlen=64, lm_head_bits=0, damp=damp)
        codes.append(compress(model, plan).weights["model.layers.0.mlp.down_proj.weight"].codes)
    assert (codes[0] != codes[1]).any()


def test_plan_fits_the_model_type(tmp_path: Path) -> None:
    """Defaults follow the model as its config tells before loading: an encoder on a target whose default
    quantizes decoder weights gets a float precision."""
    plan = make_plan(get_target("rpi4b"), "minilm-l6", tmp_path / "o")
    assert plan.precision == "fp32"
    assert any("bert is an encoder" in n for n in plan.notes), plan.notes
    plan = make_plan(get_target("rpi4b"), M, tmp_path / "o2")
    assert plan.precision == "int4"
