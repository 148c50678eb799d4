"""Command line: ``slm-export --target jetson --model smollm2-135m --out build/jetson`` and subcommands.

Exit codes: 0 pass, 1 goals missed, 2 user error, 3 environment (missing backend, device or disk space), 4 internal
bug, 5 artifact files changed since export (``validate``), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from slm_export import cli_info
from slm_export.errors import SlmExportError, Terminated, ValidationFailed

INFO = {"targets": cli_info.targets, "methods": lambda args: cli_info.methods(), "backends": cli_info.backends,
        "emulator": cli_info.emulator, "devices": cli_info.devices}
SUBCOMMANDS = ("export", "targets", "validate", "methods", "backends", "emulator", "devices", "matrix")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slm-export", description="Make a small language model ready for a device.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command")
    e = sub.add_parser("export", help="export, compile and validate a model for a target (the default command)")
    e.add_argument("--model", "-m", required=True,
                   help="built-in name, GGUF file, Hugging Face folder, or Hub id org/name[@revision]")
    e.add_argument("--target", "-t", default=None, help="target id or alias (see `slm-export targets`)")
    e.add_argument("--target-file", help="a TOML profile of your own device")
    e.add_argument("--out", "-o", help="artifact folder (default: build/<target>): written only when absent, empty or "
                   "an artifact of this tool")
    from slm_export.calibration.config import COMPRESSION, SPARSITY
    from slm_export.options import add_arguments
    from slm_export.plan import Plan

    # Every plan option's flag, help, choices and type come from its one declaration (plan.py, calibration/config.py)
    add_arguments({"": e, COMPRESSION: e.add_argument_group(COMPRESSION), SPARSITY: e.add_argument_group(SPARSITY)},
                  Plan)
    e.add_argument("--dry-run", action="store_true", help="print the plan and its predicted peak memory, and stop "
                   "(exit 3 when that exceeds this machine's)")
    e.add_argument("--no-validate", action="store_true", help="skip validation")
    em = e.add_mutually_exclusive_group()
    em.add_argument("--emulate", dest="emulate", action="store_const", const="on",
                    help="also run the artifact with the target's aarch64 runtime under QEMU (the default for rpi4b "
                    "and android-arm64 when the emulator is set up: `slm-export emulator setup`); an error if it "
                    "cannot run")
    em.add_argument("--no-emulate", dest="emulate", action="store_const", const="off",
                    help="host validation only")
    e.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _device_args(e)
    t = sub.add_parser("targets", help="list built-in targets, or `targets show NAME`")
    t.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    t.add_argument("name", nargs="?")
    t.add_argument("--json", action="store_true")
    sub.add_parser("methods", help="list compression methods and sparsity patterns")
    b = sub.add_parser("backends", help="which backends are usable on this machine, and why not")
    b.add_argument("--json", action="store_true")
    emu = sub.add_parser("emulator", help="the aarch64 emulator (QEMU): `emulator setup` builds it, `emulator` "
                         "says whether it can run")
    emu.add_argument("action", nargs="?", choices=("status", "setup"), default="status")
    v = sub.add_parser("validate", help="re-run validation of an existing artifact")
    v.add_argument("artifact")
    v.add_argument("--eval-data", help="evaluation text (default: what the export used)")
    v.add_argument("--json", action="store_true")
    vm = v.add_mutually_exclusive_group()
    vm.add_argument("--emulate", dest="emulate", action="store_const", const="on", help="run under the emulator too")
    vm.add_argument("--no-emulate", dest="emulate", action="store_const", const="off", help="no emulated run")
    _device_args(v)
    _matrix_args(sub)
    d = sub.add_parser("devices", help="`devices check ssh://user@host[:port]`: reachable? runtimes, CPU, memory, disk")
    d.add_argument("action", choices=("check",))
    d.add_argument("url")
    d.add_argument("--identity", "-i", help="SSH private key (default: your ssh agent and ~/.ssh keys)")
    d.add_argument("--known-hosts", help="known_hosts file to check the device's key against (default ~/.ssh/)")
    d.add_argument("--json", action="store_true")
    return p


def _matrix_args(sub: Any) -> None:
    m = sub.add_parser("matrix", help="export every cell of models x targets x precisions x methods (a TOML file) on "
                       "a Ray cluster, then one comparison report (docs/matrix.md)")
    m.add_argument("file", help="the matrix file (TOML)")
    m.add_argument("--out", "-o", help="the matrix's folder: a folder per cell and matrix.md/.html (default: the "
                   "file's out)")
    m.add_argument("--ray-address", help="run the cells on this Ray cluster (its nodes need slm-export installed and "
                   "the models and out folder at the same paths) instead of a local one started for the run")
    m.add_argument("--rerun", action="store_true", help="run every cell, also those whose inputs and artifact are "
                   "unchanged since the last run")
    m.add_argument("--json", action="store_true", help="print matrix.json on stdout")


def _device_args(p: argparse.ArgumentParser) -> None:
    from slm_export.options import add_arguments
    from slm_export.validation.validate import DEVICE, EFFORT, ValidationSettings

    groups = {DEVICE: p.add_argument_group(DEVICE), EFFORT: p.add_argument_group(EFFORT)}
    add_arguments(groups, ValidationSettings)  # the validation flags, from their one declaration
    groups[DEVICE].add_argument("--junit", help="write the goals as JUnit XML (one test case per goal) to this file")


def _settings(args: argparse.Namespace) -> Any:
    from slm_export.goals import load_goals
    from slm_export.options import given
    from slm_export.validation.ssh import DeviceUrl
    from slm_export.validation.validate import ValidationSettings

    if args.device:
        DeviceUrl.parse(args.device)  # a malformed URL is a user error before any work starts
    if args.goals_file:
        load_goals(args.goals_file)
    return ValidationSettings(**given(ValidationSettings, vars(args)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The literal form `slm-export --target jetson --model ...` (no subcommand) is the export command.
    if not any(a in SUBCOMMANDS for a in argv[:2]) and not {"-h", "--help"} & set(argv[:1]):
        argv = [a for a in argv if a == "--debug"] + ["export"] + [a for a in argv if a != "--debug"]
    args = _parser().parse_args(argv)
    # A CI timeout sends SIGTERM: unwind like Ctrl-C so the temporary artifact folder is removed.
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # torchao (imported by transformers and ExecuTorch) reports its CUDA kernels missing on CPU torch, and
    # torch's pytree deprecation notes about torchao's enums: noise for a user, not a fault.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _dispatch(args)
    except Exception as exc:  # an internal bug: say so plainly, traceback only with --debug
        if args.debug:
            raise
        _error(f"internal error ({type(exc).__name__}): {exc}. This is a bug in slm-export: please report it with "
               "the command line and the traceback that --debug prints.")
        return 4


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; every error a user or the environment can cause becomes its exit code here."""
    try:
        if args.command in INFO:
            return INFO[args.command](args)
        if args.command == "validate":
            return _validate(args)
        if args.command == "export":
            return _export(args)
        if args.command == "matrix":
            return _matrix(args)
        _parser().print_help()
        return 2
    except ValidationFailed as exc:
        if getattr(args, "junit", None) and exc.report is not None:
            _write_junit(exc.report, args.junit)
        _error(f"FAIL: {exc}")
        if getattr(args, "json", False) and exc.report is not None:
            print(json.dumps(exc.report, indent=2, default=str))
        return exc.exit_code
    except SlmExportError as exc:
        _error(f"error: {exc}")
        return exc.exit_code
    except BrokenPipeError:  # `slm-export targets | head`: the reader left; say nothing more
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as exc:
        _error("interrupted: no artifact was written")
        return 143 if isinstance(exc, Terminated) else 130


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _error(msg: str) -> None:
    """One unwrapped line (CI logs are grepped); red only on a terminal."""
    if sys.stderr.isatty():
        msg = f"\033[1;31m{msg}\033[0m"
    print(msg, file=sys.stderr, flush=True)


def _progress() -> tuple[Any, Any]:
    """Bars on a terminal, plain lines otherwise. Returns (callback, closer)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return (lambda stage, what: print(f"[slm-export] {stage}: {what}", file=sys.stderr, flush=True)), None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    bar.start()
    tasks: dict[str, Any] = {}

    def update(stage: str, what: str) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=1)
        if what == "done":
            bar.update(tasks[stage], completed=1, description=f"{stage} [green]done")
        else:
            bar.update(tasks[stage], description=f"{stage}: {what}")

    return update, bar.stop


def _export(args: argparse.Namespace) -> int:
    from slm_export.options import given
    from slm_export.pipeline import IGNORED, make_plan, run
    from slm_export.plan import Plan
    from slm_export.targets import get_target

    profile = get_target(args.target, args.target_file)
    out = args.out or f"build/{profile.id}"
    options = given(Plan, vars(args))
    options.pop("precision", None)
    options.pop("eval_data", None)
    options["emulate"] = args.emulate
    plan = make_plan(profile, args.model, out, args.precision, args.eval_data, not args.no_validate, **options)
    for note in plan.notes:
        if note.startswith(IGNORED):
            _error("warning: " + note[len(IGNORED):])
    settings = _settings(args)
    if args.dry_run:
        return _dry_run(plan, profile, settings)
    progress, close = _progress()
    try:
        result = run(plan, profile, progress, settings)
    finally:
        if close:
            close()
    return _finish(result.report, args.json, out, args.junit)


def _dry_run(plan: Any, profile: Any, settings: Any) -> int:
    """Print the plan and its predicted peak memory (the model's shapes read, not its weights, when it streams);
    exit 3 when that peak exceeds this machine's memory."""
    from slm_export.errors import OutOfMemory
    from slm_export.memory import check_fits, predict
    from slm_export.models import load_model
    from slm_export.models.lazy import total_memory

    model = load_model(plan.model, {"on": True, "off": False}.get(plan.stream))
    prediction = predict(model, plan, settings)
    print(json.dumps({"plan": plan.to_dict(), "target": profile.id,
                      "memory": {**prediction.to_dict(), "machine_mb": round(total_memory() / 2**20)}}, indent=2))
    problem = check_fits(prediction, total_memory())
    if problem:
        raise OutOfMemory(problem)
    return 0


def _matrix(args: argparse.Namespace) -> int:
    from slm_export.matrix import run_matrix

    done = run_matrix(args.file, args.out, args.ray_address, lambda line: _say(f"[matrix] {line}"), args.rerun)
    if args.json:
        print((done.out / "matrix.json").read_text(encoding="utf-8"), end="")
    return done.exit_code


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _validate(args: argparse.Namespace) -> int:
    from slm_export.revalidate import revalidate

    settings = _settings(args)
    progress, close = _progress()
    try:
        result = revalidate(args.artifact, args.eval_data, progress, settings, args.emulate)
    finally:
        if close:
            close()
    return _finish(result.report, args.json, args.artifact, args.junit)


def _write_junit(report: dict[str, Any], path: str) -> None:
    from slm_export.report_md import junit_xml

    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(junit_xml(report))
    tmp.replace(target)


def _finish(report: dict[str, Any], as_json: bool, out: str, junit: str | None = None) -> int:
    if junit:
        _write_junit(report, junit)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    from rich.console import Console

    from slm_export.report_md import fmt, headline

    c = Console(highlight=False, soft_wrap=True)
    c.print(f"[bold]{report['verdict']}[/bold]  {report['model']['name']} -> {report['target']['id']}  ({out})")
    for g in report["goals"]:
        c.print(f"  {g['status']}  {g['metric']} = {fmt(g.get('value'))} (goal {g['op']} {fmt(g['threshold'])})",
                markup=False)
    for label, value, where in headline(report):
        c.print(f"  {label}: {value}  [{where}]", markup=False)
    c.print(f"  report: {out}/report.md (and report.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
