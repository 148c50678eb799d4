"""The accuracy budget fits on a held-out tail of the calibration text: never on the evaluation text, never
on text the calibration samples read; without a budget the calibration samples are what they always were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slm_export import text as text_mod
from slm_export.calibration import data
from slm_export.calibration.compress import CompressConfig, compress
from slm_export.calibration.data import (
    HELDOUT_LEN,
    HELDOUT_MIN,
    HELDOUT_WINDOWS,
    load_calibration,
    split_calibration,
)
from slm_export.errors import ConfigError
from slm_export.models import load_model
from slm_export.plan import Plan
from slm_export.text import builtin_split
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_model(str(make_tiny_model("llama", tmp_path_factory.mktemp("heldout") / "llama")))


def _plan(**kw: Any) -> Plan:
    base = {"target": "host", "model": "m", "out": "o", "precision": "int4", "backend": "onnxruntime",
            "graph_ops": "onnxruntime", "opset": 17, "static_shapes": False, "max_seq_len": 512,
            "validation": "host", "method": "rtn", "max_ppl_increase": 50.0}
    return Plan(**{**base, **kw})


def test_without_a_budget_the_samples_are_those_of_before(llama: Any) -> None:
    # The draw of every earlier version: the whole source tokenized, seeded offsets over all of it.
    ids = np.asarray(llama.tokenizer(builtin_split("calibration").text, add_special_tokens=False).input_ids, np.int64)
    for samples, seqlen, seed in ((4, 64, 3), (16, 512, 0)):
        starts = np.random.default_rng(seed).integers(0, ids.size - seqlen, size=samples)
        want = np.stack([ids[s:s + seqlen] for s in starts])
        got = load_calibration(llama.tokenizer, None, samples, seqlen, seed)
        assert np.array_equal(got.ids, want)
        assert "heldout_tokens" not in got.describe()


def test_heldout_tail_shares_no_position_with_samples_or_text_with_evaluation(llama: Any) -> None:
    split = split_calibration(llama.tokenizer, None, 128)
    total = split.ids.size
    assert split.heldout.size == min(HELDOUT_WINDOWS * HELDOUT_LEN, total // 4)
    assert split.heldout_start == total - split.heldout.size
    windows = split.windows()
    assert len(windows) == HELDOUT_WINDOWS
    assert all(len(w) == HELDOUT_LEN for w in windows)
    assert np.array_equal(np.concatenate(windows), split.ids[split.heldout_start:])  # the tail, in order

    seqlen, samples, seed = 128, 64, 5
    calib = load_calibration(llama.tokenizer, None, samples, seqlen, seed, holdout=True)
    assert calib.describe()["heldout_tokens"] == split.heldout.size
    # Every sample lies wholly before the tail: no token position of the source is in both.
    starts = np.random.default_rng(seed).integers(0, split.heldout_start - seqlen, size=samples)
    assert int(starts.max()) + seqlen <= split.heldout_start
    assert np.array_equal(calib.ids, np.stack([split.ids[s:s + seqlen] for s in starts]))
    assert np.array_equal(split.samples(samples, seqlen, seed).ids, calib.ids)

    # The tail is calibration text, not evaluation text: none of its 64-token runs occur in the evaluation half.
    ev = llama.tokenizer(builtin_split("evaluation").text, add_special_tokens=False).input_ids
    runs = {tuple(ev[i:i + 64]) for i in range(len(ev) - 63)}
    tail = split.heldout.tolist()
    assert not any(tuple(tail[i:i + 64]) in runs for i in range(0, len(tail) - 63, 8))


def test_a_text_too_short_for_both_parts_is_refused(llama: Any, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text(builtin_split("calibration").text[:1500])
    n = len(llama.tokenizer(short.read_text(), add_special_tokens=False).input_ids)
    assert 512 + 1 < n < 4 * HELDOUT_MIN  # enough for samples alone: only the held-out part makes it too short
    load_calibration(llama.tokenizer, str(short), 4, 512)
    with pytest.raises(ConfigError, match=rf"has {n} tokens, too few for both .* needs at least \d+ tokens"):
        load_calibration(llama.tokenizer, str(short), 4, 512, holdout=True)
    with pytest.raises(ConfigError, match="too few for both"):
        split_calibration(llama.tokenizer, str(short), 512)
    assert data.heldout_size(4 * HELDOUT_MIN) == HELDOUT_MIN


def test_the_same_file_for_calibration_and_evaluation_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("some text " * 50)
    b.write_text("some text " * 50)
    with pytest.raises(ConfigError, match="hold the same text"):
        data.check_budget_sources(str(a), str(a))
    with pytest.raises(ConfigError, match="hold the same text"):
        data.check_budget_sources(str(a), str(b))
    b.write_text("other text " * 50)
    data.check_budget_sources(str(a), str(b))
    data.check_budget_sources(None, None)
    data.check_budget_sources(str(a), None)


def test_the_budget_fits_on_the_heldout_tail_and_never_reads_the_evaluation_text(
        llama: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slm_export.calibration.budget import BUDGET_MARGIN, fit_budget

    poison = tmp_path / "eval.txt"
    poison.write_bytes(b"\x00\xff not text")  # any read of it as text is a ConfigError
    reads: list[str] = []

    def guard(fn: Any) -> Any:
        def wrapped(path: Any, part: str = "evaluation") -> Any:
            reads.append(part)
            if part == "evaluation":
                raise AssertionError("the budget's search read the evaluation text")
            return fn(path, part)
        return wrapped

    monkeypatch.setattr(text_mod, "load_text", guard(text_mod.load_text))
    monkeypatch.setattr(text_mod, "check_text_input", guard(text_mod.check_text_input))
    monkeypatch.setattr(data, "check_text_input", guard(data.check_text_input))

    for cfg, disjoint in ((CompressConfig("int4", "rtn", 32), True),
                          (CompressConfig("int4", "gptq", 32, calib_samples=4, calib_seqlen=128, calib_holdout=True),
                           True),
                          (CompressConfig("int4", "gptq", 32, calib_samples=4, calib_seqlen=128), False)):
        compressed = compress(llama, cfg)
        plan = _plan(eval_data=str(poison), method=cfg.method, calib_seqlen=cfg.calib_seqlen)
        fit = fit_budget(llama, compressed, plan, None)
        b = fit.budget
        split = split_calibration(llama.tokenizer, None, 256)
        assert b["fitted_on"]["tokens"] == split.heldout.size
        assert b["fitted_on"]["first_token"] == split.heldout_start
        assert b["fitted_on"]["sha256"] == split.describe_heldout()["sha256"]
        assert b["heldout_ppl_change_pct"] <= 50.0 * BUDGET_MARGIN
        assert b["eval_ppl_change_pct"] is None
        assert b["calibration_disjoint_from_heldout"] is disjoint
        assert "held-out calibration tokens, not the evaluation text" in fit.notes[-1]
    assert reads
    assert "evaluation" not in reads
