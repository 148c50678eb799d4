"""Where an artifact goes, and what the tool may touch on the way.

Rules, each for the user's files:
- ``--out`` is written only when it is absent, empty, or an artifact folder this tool wrote (its
  ``artifact.json`` lists every file it holds); anything else is refused before any work unless ``--force``.
- Never the filesystem root, a mount point, the current folder or the home folder (or a folder above them),
  nor a folder that holds the run's own inputs, even with ``--force``: the artifact replaces the folder whole.
- One run at a time per output folder: a lock file beside it, held with ``flock`` (released by the kernel
  when a run dies), names the holder's pid.
- Partial folders of runs that were killed (``.NAME.partial-PID``, ``.NAME.old-PID``) are removed at the
  next run's start, and the run says so.
- A run whose goals fail never replaces a passing artifact: it lands beside it as ``NAME.failed``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slm_export.errors import ConfigError, DiskFull, OutputBusy

MANIFEST_FILE = "artifact.json"
PASSING = ("PASS", "NO GOALS")
NEARLY_FULL = 1 << 20  # bytes free under which a failed write is put down to a full disk


def resolve_out(out: str | Path) -> Path:
    """The output folder as an absolute path with no ``..`` and no symlinks (``--out .`` gets its real name)."""
    return Path(os.path.realpath(Path(out).expanduser()))


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def is_our_artifact(folder: Path) -> bool:
    """An artifact folder this tool wrote: its manifest parses and carries the fields only the exporter writes."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"fingerprint", "source_model", "files"} <= set(data)


def foreign_files(folder: Path) -> list[str]:
    """Files in an artifact folder that its manifest's integrity record does not list (the user's own):
    empty for an artifact of an older version, which has no such record."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        listed = set(data["integrity"]["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return sorted(rel for rel in _files(folder) if rel != MANIFEST_FILE and rel not in listed)


def _files(folder: Path) -> Iterator[str]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() or p.is_symlink():
            yield p.relative_to(folder).as_posix()


def passing_verdict(folder: Path) -> bool:
    """The artifact in ``folder`` was validated and passed (or had no goals)."""
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("verdict") in PASSING


def failed_name(out: Path) -> Path:
    """Where a run that misses its goals leaves its artifact when a passing one holds ``out``."""
    return out.parent / f"{out.name}.failed"


def check_out(out: Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> str:
    """Refuse an output folder the tool may not replace; return its state: absent, empty or artifact."""
    _never_replaceable(out, inputs)
    if not out.exists() and not out.is_symlink():
        return "absent"
    if not out.is_dir():
        raise ConfigError(f"cannot write the output folder {out}: it exists and is not a folder")
    if os.path.ismount(out):
        raise ConfigError(f"--out {out} is a mount point; name a folder inside it")
    entries = sorted(os.listdir(out))
    if not entries:
        return "empty"
    if is_our_artifact(out):
        extra = foreign_files(out)
        if extra and not force:
            raise ConfigError(f"{out} is an slm-export artifact but also holds files this tool did not write "
                              f"({_some(extra)}); move them out, choose another --out, or pass --force to "
                              "replace the folder with them")
        return "artifact"
    if not force:
        raise ConfigError(f"{out} exists and is not an slm-export artifact (it holds {_some(entries)}); "
                          "choose another --out, empty it, or pass --force to replace it and everything in it")
    return "artifact"


def _never_replaceable(out: Path, inputs: Iterable[str | Path | None]) -> None:
    """The root, the current and home folders (and those above them) and folders holding the inputs: refused
    even with --force."""
    where = f"--out {out}"
    if out.parent == out:
        raise ConfigError(f"{where}: the filesystem root cannot be an artifact folder; name a new folder")
    for name, special in (("the current folder", Path.cwd()), ("your home folder", Path.home())):
        if _is_within(resolve_out(special), out):
            raise ConfigError(f"{where} is {name} or a folder above it, which the artifact would replace whole; "
                              "name a new folder such as build/<target>")
    for item in inputs:
        if item is not None and os.path.exists(item) and _is_within(resolve_out(item), out):
            raise ConfigError(f"{where} holds this run's input {item}, which the artifact would replace; "
                              "name another folder")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return f"{len(names)} entries: {shown}, ..." if len(names) > 3 else shown


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[str]:
    """Remove the partial and set-aside folders of dead runs on ``out``; return a note for each."""
    notes = []
    if not out.parent.is_dir():
        return notes
    for kind in ("partial", "old"):
        for p in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid_text = p.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit() or _alive(int(pid_text)) or not p.is_dir():
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p}, left by an interrupted run (pid {pid_text}, {size / 1e6:.1f} MB)")
    return notes


@dataclass
class OutputLock:
    """``flock`` on ``.NAME.lock`` beside the output folder; a second run fails at once naming the holder."""

    out: Path
    fd: int = -1

    @property
    def path(self) -> Path:
        return self.out.parent / f".{self.out.name}.lock"

    def acquire(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusy(f"another slm-export run (pid {holder}) is writing {self.out}; wait for it to "
                                 "finish or choose another --out") from None
            # The holder before us may have unlinked the file after we opened it: lock the file on disk.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def place(tmp: Path, dest: Path) -> None:
    """Move the finished artifact into place; an older folder there is replaced only now, after the move."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
    try:
        tmp.rename(dest)
    except OSError:
        if old is not None:
            old.rename(dest)  # put the old artifact back: a failed move must not lose it
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def free_bytes(folder: Path) -> int:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_space(folder: Path, needed: int) -> None:
    """Refuse before the work when the disk holding ``folder`` cannot take the predicted artifact."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFull(f"not enough disk space for the artifact in {folder}: about {needed / 1e6:.0f} MB needed, "
                       f"{free / 1e6:.0f} MB free; free some space or choose another --out")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, whether raised as OSError or wrapped in a runtime's own error text (ONNX, ONNX Runtime, torch)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False
