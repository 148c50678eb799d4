"""Options declared once: a dataclass field with an ``Option`` in its metadata is a CLI flag (help, choices,
type), a range check and a report entry, all from that one declaration.

    group_size: int = opt(32, "weights per quantization group along the input", check=power_of_two(16))

The CLI builds its flags from the fields (``add_arguments``), the planner reads the values the user gave
(``given``) and checks them (``check_values``) before any work, and notes the ones the plan will not read
(``unread``). A field without an ``Option`` is decided by the planner alone and has no flag.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from slm_export.errors import ConfigError

Check = Callable[[Any], "str | None"]  # the problem with a value, or None


@dataclass(frozen=True)
class Option:
    """How one field appears to users."""

    help: str
    group: str = ""
    flag: str | None = None  # default: --field-name
    short: str | None = None
    choices: tuple[Any, ...] | None = None
    parse: Callable[[str], Any] | None = None  # argparse type; default: the field's own type
    metavar: str | None = None
    switch: bool = False  # a flag without a value that sets True
    check: Check | None = None
    # Whether a plan reads the field; when it does not, a value the user gave is noted, not silently dropped.
    applies: Callable[[Any], bool] | None = None
    applies_to: str = ""

    def flag_for(self, name: str) -> str:
        return self.flag or "--" + name.replace("_", "-")


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A field with a default and its ``Option``."""
    return field(default=default, metadata={"option": Option(help, **kwargs)})


def declared(cls: Any) -> Iterator[tuple[Field[Any], Option]]:
    for f in fields(cls):
        option = f.metadata.get("option")
        if option is not None:
            yield f, option


def default_of(f: Field[Any]) -> Any:
    return f.default if f.default is not MISSING else None


def add_arguments(groups: dict[str, Any], cls: Any) -> None:
    """Add a flag for every declared field of ``cls`` to the argparse group named by its ``Option.group``.

    Every flag defaults to None, so that the planner can tell a value the user gave from a default."""
    for f, o in declared(cls):
        target = groups[o.group]
        names = [o.flag_for(f.name)] + ([o.short] if o.short else [])
        if o.switch:
            target.add_argument(*names, dest=f.name, action="store_true", default=None, help=o.help)
            continue
        kind = o.parse or _parser_for(f)
        target.add_argument(*names, dest=f.name, type=kind, choices=o.choices, metavar=o.metavar, default=None,
                            help=_help(o.help, f))


def _help(text: str, f: Field[Any]) -> str:
    default = default_of(f)
    if default is None or default is False or default == "" or "default" in text:
        return text
    return f"{text} (default {default})"


def _parser_for(f: Field[Any]) -> Callable[[str], Any]:
    kind = str(f.type)
    if kind.startswith("int"):
        return whole_number
    if kind.startswith("float"):
        return number
    return str


def whole_number(text: str) -> int:
    if not text.strip().lstrip("+-").isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}")
    return int(text)


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def whole_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("+-").isdigit() else None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, not {text!r}")
        return value

    return parse


def positive(text: str) -> float:
    """An argparse type: a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
    return value


def given(cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The declared fields of ``cls`` that ``values`` sets (not None)."""
    names = {f.name for f, _ in declared(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def check_values(cls: Any, values: dict[str, Any]) -> None:
    """Each given value against its field's check; the first problem is a ``ConfigError`` naming the flag."""
    for f, o in declared(cls):
        value = values.get(f.name)
        if value is None or o.check is None:
            continue
        problem = o.check(value)
        if problem:
            raise ConfigError(f"{o.flag_for(f.name)} {problem}, not {value!r}")


def unread(plan: Any, user: set[str]) -> list[str]:
    """A note for each option the user gave that ``plan`` does not read."""
    notes = []
    for f, o in declared(type(plan)):
        if f.name in user and o.applies is not None and not o.applies(plan):
            notes.append(f"{o.flag_for(f.name)} applies to {o.applies_to}; this plan ({plan.describe()}) does not "
                         "read it")
    return notes


# -- checks ---------------------------------------------------------------------------------------------------

def at_least(low: float) -> Check:
    def check(value: Any) -> str | None:
        return None if _is_number(value) and value >= low else f"must be at least {low}"

    return check


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if not _is_number(value):
            return "must be a number"
        ok_low = value > low if open_low else value >= low
        ok_high = value < high if open_high else value <= high
        if ok_low and ok_high:
            return None
        return f"must be in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"

    return check


def power_of_two(low: int, zero_ok: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if zero_ok and value == 0:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and not value & (value - 1)
        return None if ok else f"must be a power of two >= {low}" + (" (or 0: off)" if zero_ok else "")

    return check


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
