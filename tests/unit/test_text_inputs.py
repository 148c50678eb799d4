"""Text inputs are checked before any work: each bad one a ConfigError (exit 2) that says what is wrong."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from slm_export.errors import ConfigError
from slm_export.text import (
    BUILTIN,
    MIN_TOKENS,
    TextSource,
    check_text_input,
    check_token_count,
    load_text,
    token_windows,
)
from slm_export.validation.ssh import DeviceUrl


class WordTokenizer:
    """One token per whitespace-separated word: enough to count tokens without a model."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> Any:
        return types.SimpleNamespace(input_ids=list(range(len(text.split()))))


def test_missing_empty_whitespace(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="evaluation data .*nope.txt: no such file"):
        check_text_input(str(tmp_path / "nope.txt"), "evaluation")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        check_text_input(str(empty), "evaluation")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n  \r\n")
    with pytest.raises(ConfigError, match="calibration data .* holds only whitespace"):
        check_text_input(str(blank), "calibration")


def test_binary_and_non_utf8_name_the_first_bad_byte(tmp_path: Path) -> None:
    nul = tmp_path / "model.bin"
    nul.write_bytes(b"abc\x00def\xff")
    with pytest.raises(ConfigError, match=r"is binary, not text: byte 3 is NUL"):
        check_text_input(str(nul), "evaluation")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\x00".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text: byte 3 \(0xe9\)"):
        check_text_input(str(latin), "evaluation")  # the first bad byte is the é, before the NUL
    with pytest.raises(ConfigError, match="is binary"):
        load_text(str(nul), "evaluation")  # load_text makes the same checks


def test_a_folder_is_named_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    with pytest.raises(ConfigError, match="evaluation data .*texts is a folder, not a text or JSONL file$"):
        check_text_input(str(folder), "evaluation")
    with pytest.raises(ConfigError, match="is a folder.*a `datasets` folder saved with save_to_disk holds "
                                          "dataset_info.json, dataset_dict.json or state.json; this one holds none"):
        check_text_input(str(folder), "calibration")
    with pytest.raises(ConfigError, match="is a folder"):
        load_text(str(folder), "evaluation")


def _fake_datasets(rows: list[str]) -> types.ModuleType:
    mod = types.ModuleType("datasets")

    class Dataset:
        column_names = ["text"]

        def __getitem__(self, key: str) -> list[str]:
            return rows

    class DatasetDict(dict):  # type: ignore[type-arg]
        pass

    mod.DatasetDict = DatasetDict  # type: ignore[attr-defined]
    mod.load_from_disk = lambda path: DatasetDict(train=Dataset())  # type: ignore[attr-defined]
    return mod


def test_a_datasets_folder_is_calibration_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(["first row", "second row"]))
    source = check_text_input(str(folder), "calibration")
    assert source == TextSource(str(folder), "first row\n\nsecond row")
    with pytest.raises(ConfigError, match="is a folder"):
        check_text_input(str(folder), "evaluation")  # evaluation text is a file or the built-in half
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(["", "  "]))
    with pytest.raises(ConfigError, match="holds no text"):
        check_text_input(str(folder), "calibration")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ConfigError, match="pip install datasets"):
        check_text_input(str(folder), "calibration")


def test_jsonl_lines_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(ConfigError, match="line 2: not JSON"):
        check_text_input(str(bad), "calibration")
    wrong = tmp_path / "w.jsonl"
    wrong.write_text('{"text": "x"}\n\n["a list"]\n')
    with pytest.raises(ConfigError, match='line 3: expected an object with a "text" string'):
        check_text_input(str(wrong), "calibration")
    hollow = tmp_path / "h.jsonl"
    hollow.write_text('{"text": ""}\n{"text": " "}\n')
    with pytest.raises(ConfigError, match="every line's \"text\" is empty"):
        check_text_input(str(hollow), "evaluation")
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert check_text_input(str(good), "evaluation").text == "one\n\ntwo"


def test_plain_text_and_the_builtin_split(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line one\r\nline two\rline three\n")
    assert check_text_input(str(notes), "evaluation").text == notes.read_text()  # newlines as read_text gives
    assert check_text_input(None, "evaluation").name == f"{BUILTIN}/evaluation"
    assert check_text_input(None, "calibration").name == f"{BUILTIN}/calibration"


def test_token_count_refuses_too_few_and_notes_fewer_windows() -> None:
    tok = WordTokenizer()
    tiny = TextSource("tiny.txt", "word " * 5)
    with pytest.raises(ConfigError, match=rf"evaluation data tiny.txt has 5 tokens; one window needs at least "
                                          rf"{MIN_TOKENS} \(the 8 x 512-token windows asked need 4096\)"):
        check_token_count(tok, tiny, 8, 512, "evaluation")
    short = TextSource("short.txt", "word " * 100)
    note = check_token_count(tok, short, 8, 512, "evaluation")
    assert note is not None
    assert "has 100 tokens" in note
    assert "1 window(s) of 100 tokens" in note
    assert len(token_windows(tok, short, 8, 512)) == 1  # what validation then measures
    some = TextSource("some.txt", "word " * 1500)
    note = check_token_count(tok, some, 8, 512, "evaluation")
    assert note is not None
    assert "2 window(s) of 512 tokens" in note
    assert len(token_windows(tok, some, 8, 512)) == 2
    assert check_token_count(tok, TextSource("full.txt", "word " * 4096), 8, 512) is None
    assert check_token_count(tok, TextSource("exact.txt", "word " * 16), 1, 16) is None


@pytest.mark.parametrize(("url", "message"), [
    ("ssh://pi@board:99999", "port must be 1-65535, not 99999"),
    ("ssh://pi@board:0", "port must be 1-65535, not 0"),
    ("ssh://pi@board:65536", "port must be 1-65535, not 65536"),
    ("ssh://pi@board:22x", "the port '22x' is not a number"),
])
def test_device_port_out_of_range(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DeviceUrl.parse(url)
    assert DeviceUrl.parse("ssh://pi@board:65535").port == 65535
    assert DeviceUrl.parse("ssh://pi@board").port == 22
