"""What an artifact's files should be: sizes and sha256 of every file, recorded in ``artifact.json`` at export,
checked by ``validate`` before it runs anything.

``artifact.json`` seals itself too: it is written in one canonical form (sorted keys, two-space indent) with the
sha256 of that form minus the ``manifest_sha256`` field, so an edit anywhere in it, even one that leaves valid JSON,
is found. The reports are listed like every other file, and re-sealed when ``validate`` rewrites them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from slm_export.errors import IntegrityError

MANIFEST_FILE = "artifact.json"
REPORTS = ("report.json", "report.md", "report.html")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path, skip: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict[str, Any]]:
    """Every regular file under ``folder`` by relative path: its size and sha256."""
    table = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            table[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return table


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _canonical(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def _self_hash(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(_canonical(body).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``artifact.json`` in its canonical form with its own hash (atomically: a reader never sees half)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    body["manifest_sha256"] = _self_hash(body)
    tmp = folder / f".{MANIFEST_FILE}.partial"
    tmp.write_text(_canonical(body), encoding="ascii")
    tmp.replace(folder / MANIFEST_FILE)


def read_manifest(folder: Path) -> dict[str, Any]:
    from slm_export.errors import ConfigError

    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} is not an slm-export artifact (no {MANIFEST_FILE})")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"{path} is corrupt ({exc}); export the artifact again") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} is corrupt (not a JSON object); export the artifact again")
    return data


def seal(folder: Path, manifest: dict[str, Any], table: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Record every file's size and hash in the manifest and write it; returns the integrity record."""
    record = {"algorithm": "sha256", "hashed_at": now(), "files": table if table is not None else file_table(folder)}
    write_manifest(folder, {**manifest, "integrity": record})
    return record


def verify(folder: Path) -> dict[str, Any]:
    """Check every file ``artifact.json`` lists, and the manifest itself. Returns the manifest.

    Raises ``IntegrityError`` naming the first file that is missing, of another size or another hash. A manifest
    without a record (an artifact of an older version) passes with ``integrity`` absent: the caller says so.
    """
    manifest = read_manifest(folder)
    path = folder / MANIFEST_FILE
    if "manifest_sha256" in manifest:
        if path.read_bytes() != _canonical(manifest).encode() or manifest["manifest_sha256"] != _self_hash(manifest):
            raise IntegrityError(f"{path} was changed after export (its own hash differs); export the artifact again")
    elif "integrity" in manifest:
        raise IntegrityError(f"{path} lists file hashes but has lost its own; export the artifact again")
    record = manifest.get("integrity")
    if record is None:
        return manifest
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise IntegrityError(f"{path}: the integrity record is malformed; export the artifact again")
    for rel, want in files.items():
        target = folder / rel
        if not inside(folder, rel) or not isinstance(want, dict):
            raise IntegrityError(f"{path} lists {rel!r}, which is not a file of the artifact")
        if not target.is_file():
            raise IntegrityError(f"{target} is missing (listed in {MANIFEST_FILE}); export the artifact again")
        size = target.stat().st_size
        if size != want.get("bytes"):
            raise IntegrityError(f"{target} is {size} bytes, {want.get('bytes')} at export: the file changed "
                                 "since export; export the artifact again")
        if sha256_file(target) != want.get("sha256"):
            raise IntegrityError(f"{target} changed since export (sha256 differs from {MANIFEST_FILE}); export the "
                                 "artifact again")
    return manifest


def inside(folder: Path, rel: Any) -> bool:
    """``rel`` names a path inside ``folder``: relative, no ``..``, not escaping through a symlink."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return False
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return False
    try:
        (folder / p).resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def unlisted(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Files present but not in the record: never run, reported."""
    files = (manifest.get("integrity") or {}).get("files") or {}
    return [rel for rel in file_table(folder) if rel not in files]


def reseal_reports(folder: Path, manifest: dict[str, Any]) -> None:
    """After ``validate`` rewrote the reports: their new hashes, the rest of the record as it was."""
    record = manifest.get("integrity")
    if not record:
        return
    files = dict(record["files"])
    for name in REPORTS:
        if (folder / name).is_file():
            files[name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
    write_manifest(folder, {**manifest, "integrity": {**record, "files": files, "reports_hashed_at": now()}})
