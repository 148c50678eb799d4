"""The matrix file: models x targets x precisions x methods, shared options and per-cell overrides, read and
checked whole before any cell runs (docs/matrix.md).

Option keys are the export command's flags without their dashes (``group-size = 64``, ``eval-windows = 1``);
each value goes through the same declaration as the flag (``options.py``): its parser, its choices and its
range check. A key or value the CLI would refuse is a ``ConfigError`` (exit 2) naming the key and where it is.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_export.calibration.config import METHODS, PRECISIONS
from slm_export.errors import ConfigError
from slm_export.options import Option, declared, whole_number

AXES = ("model", "target", "precision", "method")
TOP_KEYS = ("out", "models", "targets", "precisions", "methods", "options", "override")
# Keys the matrix sets itself (its axes and folders) or that only make sense for one export at a time.
NOT_OPTIONS = {"precision", "method", "out", "model", "target", "target-file", "dry-run", "json", "junit"}
# Option values that name files: relative ones are read from the matrix file's folder.
PATH_KEYS = {"eval_data", "calib_data", "goals_file", "identity", "known_hosts"}
QUANTIZED = ("int8", "int4")


@dataclass(frozen=True)
class Key:
    """One option key of the matrix file: the field it sets, on ``Plan`` ("plan") or ``ValidationSettings``."""

    name: str
    field: str
    where: str
    option: Option | None
    kind: Any = None


def option_keys() -> dict[str, Key]:
    """Every key an [options] or [[override]] table may hold, from the option declarations."""
    from slm_export.plan import Plan
    from slm_export.validation.validate import ValidationSettings

    keys: dict[str, Key] = {}
    for cls, where in ((Plan, "plan"), (ValidationSettings, "settings")):
        for f, o in declared(cls):
            name = o.flag_for(f.name).removeprefix("--")
            if name not in NOT_OPTIONS:
                keys[name] = Key(name, f.name, where, o, f.type)
    # The export command's switches that are not declared options: --no-validate and --emulate/--no-emulate.
    keys["no-validate"] = Key("no-validate", "validate", "plan", None, "switch")
    keys["emulate"] = Key("emulate", "emulate", "plan", None, "emulate")
    return keys


@dataclass(frozen=True)
class ModelRef:
    name: str  # the cell folders' prefix
    ref: str  # what --model takes: a built-in name, a path or a hub id


@dataclass(frozen=True)
class Cell:
    """One export of the matrix: its axes' values and its options by field name, overrides applied."""

    model: ModelRef
    target: str
    precision: str
    method: str | None
    plan: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " x ".join(x for x in (self.model.name, self.target, self.precision, self.method) if x)


@dataclass(frozen=True)
class MatrixSpec:
    source: Path
    out: Path | None
    cells: tuple[Cell, ...]


def read_matrix(path: str | Path) -> MatrixSpec:
    """Read and check a matrix file; every cell with its options. Raises ``ConfigError`` on any problem."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"matrix file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the matrix file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    _known(data, TOP_KEYS, f"{path}")
    base = path.parent
    keys = option_keys()
    models = _models(data.get("models"), base, path)
    targets = [_target(t, base) for t in _strings(data, "targets", path)]
    precisions = _chosen(_strings(data, "precisions", path), PRECISIONS, "precisions", path)
    methods = _methods(data.get("methods"), precisions, path)
    shared = _options(data.get("options", {}), keys, base, f"{path} [options]")
    overrides = _overrides(data.get("override", []), keys, base, path)
    cells = [_cell(m, t, p, me, shared, overrides) for m in models for t in targets for p in precisions
             for me in methods.get(p, [None])]
    _check_overrides_match(overrides, cells, path)
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise ConfigError(f"{path}: out must be a folder name (a string), not {out!r}")
    return MatrixSpec(path, (base / out).resolve() if out else None, tuple(cells))


def _known(table: dict[str, Any], allowed: tuple[str, ...] | dict[str, Any], where: str) -> None:
    for key in table:
        if key not in allowed:
            near = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _strings(data: dict[str, Any], key: str, path: Path) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{path}: {key} must be a non-empty list of names, e.g. {key} = [\"...\"]")
    if len(set(value)) != len(value):
        raise ConfigError(f"{path}: {key} names a value twice")
    return value


def _local(ref: str, base: Path) -> str:
    """A relative path is read from the matrix file's folder when it exists there; else as given (a built-in
    name, a hub id, or a path from the current folder)."""
    candidate = base / Path(ref).expanduser()
    return str(candidate.resolve()) if not Path(ref).is_absolute() and candidate.exists() else ref


def _models(value: Any, base: Path, path: Path) -> list[ModelRef]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{path}: models must be a non-empty list of models (names, paths or hub ids), or of "
                          "tables {{ name = \"...\", model = \"...\" }}")
    refs = []
    for item in value:
        if isinstance(item, dict):
            _known(item, ("name", "model"), f"{path}: models entry")
            name, ref = item.get("name"), item.get("model")
        else:
            name, ref = None, item
        if not isinstance(ref, str) or not ref or (name is not None and not isinstance(name, str)):
            raise ConfigError(f"{path}: a models entry must be a string or {{ name = \"...\", model = \"...\" }}, "
                              f"not {item!r}")
        refs.append(ModelRef(safe_name(name or Path(ref.split("@")[0]).name), _local(ref, base)))
    names = [r.name for r in refs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: two models would share the folder name {twice[0]!r}; give them names: "
                          "{ name = \"...\", model = \"...\" }")
    return refs


def safe_name(text: str) -> str:
    """A folder-name part: letters, digits, dots, dashes and underscores."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip(".")
    return cleaned or "model"


def _target(name: str, base: Path) -> str:
    return _local(name, base) if name.endswith(".toml") else name


def _methods(value: Any, precisions: list[str], path: Path) -> dict[str, list[str | None]]:
    """Methods per quantized precision: one list for all, or a table by precision; float cells have none."""
    if value is None:
        return {p: [None] for p in precisions}
    if isinstance(value, list):
        table = {p: value for p in precisions if p in QUANTIZED}
    elif isinstance(value, dict):
        _known(value, {p: 1 for p in precisions if p in QUANTIZED}, f"{path} methods")
        table = value
    else:
        raise ConfigError(f"{path}: methods must be a list, or a table of lists by precision "
                          "(methods = { int4 = [\"rtn\", \"gptq\"], int8 = [\"smoothquant\"] })")
    out: dict[str, list[str | None]] = {p: [None] for p in precisions}
    for p, names in table.items():
        out[p] = list(_chosen(_strings({"methods": names}, "methods", path), METHODS, "methods", path))
    return out


def _chosen(values: list[str], allowed: tuple[str, ...], key: str, path: Path) -> list[str]:
    for v in values:
        if v not in allowed:
            near = difflib.get_close_matches(v, allowed, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"{path}: {key}: unknown value {v!r}; {hint}known: {', '.join(allowed)}")
    return values


def _options(table: Any, keys: dict[str, Key], base: Path, where: str) -> dict[str, tuple[Key, Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of option = value")
    out = {}
    for raw, value in table.items():
        key = keys.get(raw.replace("_", "-").removeprefix("--"))
        if key is None:
            near = difflib.get_close_matches(raw.replace("_", "-"), list(keys), n=1)
            axis = " (an axis of the matrix: set it with models, targets, precisions or methods)" \
                if raw in NOT_OPTIONS else ""
            hint = f"; did you mean {near[0]!r}?" if near and not axis else ""
            raise ConfigError(f"{where}: unknown option {raw!r}{axis}{hint} (keys are the export command's flags "
                              "without their dashes: `slm-export export --help`)")
        parsed = parse_value(key, value, where)
        if key.field in PATH_KEYS and isinstance(parsed, str):
            parsed = _local(parsed, base)
        out[key.field] = (key, parsed)
    return out


def parse_value(key: Key, value: Any, where: str) -> Any:
    """A TOML value through the flag's own parser, choices and check: what the CLI would make of it."""
    from slm_export.options import check_values

    name = f"{where}: {key.name}"
    if key.kind in ("switch", "emulate") or (key.option is not None and key.option.switch):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}")
        if key.kind == "switch":
            return not value  # no-validate = true: validate False
        return ("on" if value else "off") if key.kind == "emulate" else value
    if isinstance(value, bool | list | dict):
        raise ConfigError(f"{name} takes one value as its flag does, not {value!r}")
    o = key.option
    if o is None:  # every key but the switches above comes from a declaration
        raise ConfigError(f"{name} is not an option")
    parse = o.parse or _field_parser(key.kind)
    try:
        parsed = parse(str(value))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if o.choices is not None and parsed not in o.choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, o.choices))}, not {value!r}")
    from slm_export.plan import Plan
    from slm_export.validation.validate import ValidationSettings

    try:
        check_values(Plan if key.where == "plan" else ValidationSettings, {key.field: parsed})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}".replace(f"--{key.name}", key.name)) from None
    return parsed


def _field_parser(kind: Any) -> Any:
    text = str(kind)
    if text.startswith("int"):
        return whole_number
    if text.startswith("float"):
        from slm_export.options import number

        return number
    return str


@dataclass(frozen=True)
class Override:
    match: dict[str, list[str]]
    options: dict[str, tuple[Key, Any]]
    where: str


def _overrides(value: Any, keys: dict[str, Key], base: Path, path: Path) -> list[Override]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: override must be [[override]] tables")
    out = []
    for i, table in enumerate(value, 1):
        where = f"{path} [[override]] #{i}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        match = {a: _selector(table[a], where, a) for a in AXES if a in table}
        if not match:
            raise ConfigError(f"{where} selects no cells: give one of {', '.join(AXES)} (a name or a list)")
        rest = {k: v for k, v in table.items() if k not in AXES}
        out.append(Override(match, _options(rest, keys, base, where), where))
    return out


def _selector(value: Any, where: str, axis: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: {axis} must be a name or a list of names, not {value!r}")
    return values


def _matches(o: Override, model: ModelRef, target: str, precision: str, method: str | None) -> bool:
    got = {"model": (model.name, model.ref), "target": (target, Path(target).name), "precision": (precision,),
           "method": (method,)}
    return all(any(v in got[axis] for v in wanted) for axis, wanted in o.match.items())


def _cell(model: ModelRef, target: str, precision: str, method: str | None, shared: dict[str, tuple[Key, Any]],
          overrides: list[Override]) -> Cell:
    chosen = dict(shared)
    for o in overrides:  # in file order: a later override wins
        if _matches(o, model, target, precision, method):
            chosen.update(o.options)
    plan = {f: v for f, (k, v) in chosen.items() if k.where == "plan"}
    settings = {f: v for f, (k, v) in chosen.items() if k.where == "settings"}
    return Cell(model, target, precision, method, plan, settings)


def _check_overrides_match(overrides: list[Override], cells: list[Cell], path: Path) -> None:
    """An override that selects no cell is a typo in its selector, not a no-op to pass over."""
    for o in overrides:
        if not any(_matches(o, c.model, c.target, c.precision, c.method) for c in cells):
            wanted = ", ".join(f"{a} = {v}" for a, v in o.match.items())
            raise ConfigError(f"{o.where} selects no cell of the matrix ({wanted}); the cells' values: models "
                              f"{sorted({c.model.name for c in cells})}, targets {sorted({c.target for c in cells})}"
                              f", precisions {sorted({c.precision for c in cells})}")
