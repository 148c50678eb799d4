"""``--threads`` bounds the whole run: the compress stage's torch pool too, not only validation's runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from slm_export import pipeline
from slm_export.cli import main


def test_threads_hold_for_the_compress_stage_and_are_restored(tmp_path: Path, tiny_models: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from slm_export.calibration import compress as compress_module

    seen: list[int] = []
    real = compress_module.compress

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(compress_module, "compress", spy)
    worker = torch.get_num_threads()  # the suite worker's share (conftest), given back at the end
    torch.set_num_threads(2)
    argv = ["--target", "host", "--model", str(tiny_models["llama"]), "--precision", "int4", "--method", "awq",
            "--calib-samples", "2", "--calib-seqlen", "32", "--no-validate", "--out"]
    assert main([*argv, str(tmp_path / "one"), "--threads", "1"]) == 0
    assert seen == [1]
    assert torch.get_num_threads() == 2  # the caller's setting is given back
    assert main([*argv, str(tmp_path / "default")]) == 0
    assert seen == [1, 2]  # 0 (the default): torch's own setting stands
    torch.set_num_threads(worker)


def test_torch_threads_restores_on_error() -> None:
    import torch

    inside: list[int] = []

    def fail() -> None:
        with pipeline.torch_threads(1):
            inside.append(torch.get_num_threads())
            raise RuntimeError

    worker = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError):
        fail()
    assert inside == [1]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(worker)
