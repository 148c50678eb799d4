"""A device reached over SSH: the same runner job as the emulator, run on the real board.

Transport is the system's OpenSSH client (``ssh``), never a shell on this side: every command is an
argument list, and the one string the remote shell sees is built from ``shlex.quote``-d words. Host
keys are checked against known_hosts (``StrictHostKeyChecking=yes``): a first connection to an unknown
host fails with the key's fingerprint and the command that accepts it; nothing is trusted silently.
Authentication is by key only (the user's agent or ``--identity``; ``BatchMode`` means no prompt).

Layout on the device, under the work root (``~/.slm-export-runner`` unless the URL's ``?workdir=`` says):

- ``artifacts/<sha>/``: the artifact files the job needs, keyed by their content hash and uploaded
  only when missing; an upload goes to a temporary folder that is renamed into place once complete,
  so a dropped connection never leaves a half-copied artifact that a later run would use;
- ``runs/<id>/``: the runner package, the job and its result, removed when the run ends (also after a
  failure or a timeout).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from slm_export.errors import ConfigError, DeviceError

DEFAULT_WORKDIR = "~/.slm-export-runner"


@dataclass(frozen=True)
class DeviceUrl:
    """``ssh://user@host[:port][?workdir=/path&python=python3&sysfs=/sys]``."""

    user: str | None
    host: str
    port: int
    workdir: str = DEFAULT_WORKDIR
    python: str = "python3"
    sysfs: str = "/sys"  # where the device's power sensors are read

    @staticmethod
    def parse(url: str) -> DeviceUrl:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise ConfigError(f"--device must look like ssh://user@host[:port], not {url!r}")
        try:
            given = parts.port
        except ValueError:  # not digits, or digits out of urllib's 0-65535
            raw = parts.netloc.rpartition("@")[2].rpartition(":")[2]
            if not (raw.isascii() and raw.isdigit()):
                raise ConfigError(f"--device {url!r}: the port {raw!r} is not a number") from None
            given = int(raw)
        if given is not None and not 1 <= given <= 65535:
            raise ConfigError(f"--device {url!r}: port must be 1-65535, not {given}")
        port = given or 22
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"workdir", "python", "sysfs"}
        if unknown:
            raise ConfigError(f"--device {url!r}: unknown option(s) {', '.join(sorted(unknown))} "
                              "(known: workdir, python, sysfs)")
        host, user = parts.hostname, parts.username
        for what, value in (("host", host), ("user", user or "")):
            if value.startswith("-") or any(c in value for c in " \t\n;'\"`$\\|&<>"):
                raise ConfigError(f"--device {url!r}: the {what} {value!r} is not a valid name")
        return DeviceUrl(user, host, port, query.get("workdir", DEFAULT_WORKDIR), query.get("python", "python3"),
                         query.get("sysfs", "/sys"))

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"ssh://{self.target}:{self.port}"


def _remote_path(path: str) -> str:
    """A path for the remote shell: ``~/`` stays expandable, the rest is quoted."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class SshDevice:
    """Runs commands on a device over OpenSSH with strict host keys, key auth and timeouts."""

    def __init__(self, url: str | DeviceUrl, identity: str | None = None, known_hosts: str | None = None,
                 connect_timeout: float = 10, command_timeout: float = 3600) -> None:
        self.url = url if isinstance(url, DeviceUrl) else DeviceUrl.parse(url)
        self.identity = identity
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        if identity and not Path(identity).is_file():
            raise ConfigError(f"--identity {identity}: no such key file")

    def _ssh(self) -> list[str]:
        cmd = ["ssh", "-p", str(self.url.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"ConnectTimeout={int(self.connect_timeout)}", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if self.known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity:
            cmd += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        return [*cmd, "--", self.url.target]

    def run(self, words: list[str] | str, stdin: bytes | None = None, timeout: float | None = None) -> str:
        """Run a remote command (a list of words, each quoted; or a prepared shell string); its stdout."""
        line = words if isinstance(words, str) else " ".join(shlex.quote(w) for w in words)
        try:
            res = subprocess.run([*self._ssh(), line], input=stdin, capture_output=True,
                                 timeout=timeout or self.command_timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.url}: the command timed out after {timeout or self.command_timeout:.0f} s") \
                from None
        except FileNotFoundError:
            raise DeviceError("the OpenSSH client (ssh) is not installed here: apt-get install openssh-client") \
                from None
        err = res.stderr.decode(errors="replace").strip()
        if res.returncode == 255:
            raise DeviceError(self._connection_error(err))
        if res.returncode:
            raise DeviceError(self._command_error(res.returncode, err, line))
        return res.stdout.decode(errors="replace")

    def _connection_error(self, err: str) -> str:
        u = self.url
        if "Host key verification failed" in err or "No ED25519 host key is known" in err \
                or "host key for" in err.lower():
            fp = self._fingerprint()
            how = (f"ssh-keyscan -p {u.port} {u.host} >> {self.known_hosts or '~/.ssh/known_hosts'}" if u.port != 22
                   else f"ssh-keyscan {u.host} >> {self.known_hosts or '~/.ssh/known_hosts'}")
            if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
                return (f"{u}: the host key CHANGED since it was accepted (key now offered: {fp}); if the device "
                        "was reinstalled, remove the old key with ssh-keygen -R, else do not connect")
            return (f"{u}: the host key is not in known_hosts, so the device cannot be trusted yet. It offers "
                    f"{fp}; if that is the device's key, accept it with: {how}")
        if "Permission denied" in err:
            return (f"{u}: authentication refused ({err.splitlines()[-1]}); give the key with --identity or load it "
                    "into your ssh agent, and put its public half in the device's authorized_keys")
        if "Connection refused" in err or "timed out" in err or "No route" in err or "resolve" in err:
            return f"{u}: unreachable ({err.splitlines()[-1]}); is the device on and sshd running?"
        return f"{u}: the connection failed or dropped ({err.splitlines()[-1] if err else 'ssh exit 255'})"

    def _command_error(self, code: int, err: str, line: str) -> str:
        u = self.url
        if "No space left on device" in err or "Wrote only" in err or "Disk quota exceeded" in err:
            return f"{u}: out of disk space in {u.workdir} ({err.splitlines()[-1]}); free space or pass ?workdir="
        if code in (137, -9):
            return f"{u}: the remote command was killed (SIGKILL: out of memory?); {err[-300:]}"
        return f"{u}: remote command failed (exit {code}): {err[-800:] or line[:200]}"

    def _fingerprint(self) -> str:
        try:
            scan = subprocess.run(["ssh-keyscan", "-p", str(self.url.port), "-T", "5", self.url.host],
                                  capture_output=True, timeout=15)
            fp = subprocess.run(["ssh-keygen", "-lf", "-"], input=scan.stdout, capture_output=True, timeout=15)
            lines = [ln for ln in fp.stdout.decode().splitlines() if ln.strip()]
            return "; ".join(lines) or "no key could be read"
        except (OSError, subprocess.TimeoutExpired):
            return "the fingerprint could not be read (ssh-keyscan failed)"


def artifact_hash(folder: Path, files: list[str]) -> str:
    """Content hash of the files a job reads (names and bytes)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def _tar(folder: Path, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            tar.add(folder / name, arcname=name)
    return buf.getvalue()


def files_for(folder: Path, model: str) -> list[str]:
    """The artifact files a runner needs for ``model``: the file, its external data or params file."""
    names = [model]
    for extra in (model + ".data", "tvm_params.npz" if model.endswith(".so") else ""):
        if extra and (folder / extra).is_file():
            names.append(extra)
    return names


class SshRunner:
    """The ``Runner`` for a device over SSH (see ``slm_export.validation.remote``)."""

    name = "device"

    def __init__(self, device: SshDevice) -> None:
        self.device = device
        self.last: dict[str, Any] = {}

    def where(self, result: dict[str, Any], file: str) -> str:
        e = result.get("environment", {})
        return (f"measured on device {e.get('hostname')} ({e.get('machine')}, {e.get('cpu')}, {e.get('runtime')} "
                f"{e.get('runtime_version')}, {file}) over {self.device.url}")

    def run(self, artifact: Path, job: dict[str, Any]) -> dict[str, Any]:
        dev, root = self.device, self.device.url.workdir
        names = files_for(artifact, job["model"])
        sha = artifact_hash(artifact, names)
        art = f"{root}/artifacts/{sha}"
        run_dir = f"{root}/runs/{uuid.uuid4().hex[:12]}"
        t0 = time.perf_counter()
        uploaded = self._ensure_artifact(artifact, names, art)
        upload_s = time.perf_counter() - t0
        runner_pkg = Path(__file__).resolve().parents[1] / "runner"
        pkg = {f"slm_runner/{p.name}": p.read_bytes() for p in sorted(runner_pkg.glob("*.py"))}
        pkg["job.json"] = json.dumps({**job, "model": "model-link/" + job["model"],
                                      "power_root": dev.url.sysfs}).encode()
        q = _remote_path
        limit = int(dev.command_timeout)
        t1 = time.perf_counter()
        # One session: unpack the runner, run it, print its exit code and result. The run folder goes when
        # the shell exits, also when the connection drops (HUP) or the device kills the runner at the limit,
        # which the device enforces itself, so a hung runtime cannot outlive a dropped connection.
        out = dev.run(f"RUN={q(run_dir)}; trap 'rm -rf \"$RUN\"' EXIT; trap 'exit 1' HUP INT TERM PIPE; "
                      f"mkdir -p \"$RUN\" && cd \"$RUN\" && tar -xf - && ln -s {q(art)} model-link && "
                      f"{{ timeout -s KILL {limit} {shlex.quote(dev.url.python)} -m slm_runner job.json result.json "
                      ">runner.log 2>&1; echo $?; cat result.json 2>/dev/null; true; }",
                      stdin=_tar_bytes(pkg), timeout=limit + 60)
        rc_line, _, text = out.partition("\n")
        rc = int(rc_line.strip() or -1)
        try:
            result = json.loads(text) if text.strip() else {}
        except ValueError:
            result = {}
        if rc == 137:
            if time.perf_counter() - t1 >= limit - 1:
                raise DeviceError(f"{dev.url}: the run timed out after {limit} s on the device (killed there)")
            raise DeviceError(f"{dev.url}: the runner was killed on the device (SIGKILL: out of memory?)")
        if not result.get("ok"):
            if result.get("kind") == "runtime-missing":
                raise DeviceError(f"{dev.url}: the artifact's runtime is missing on the device ({result['error']}); "
                                  f"install it there, the host runs onnxruntime {_host_version('onnxruntime')}")
            raise DeviceError(f"{dev.url}: the run failed on the device (exit {rc}): "
                              f"{result.get('error') or 'no result'}")
        self.last = {"uploaded": uploaded, "upload_s": round(upload_s, 1), "artifact_sha": sha}
        return result

    def _ensure_artifact(self, folder: Path, names: list[str], art: str) -> bool:
        """Upload the files unless the device already holds this exact artifact; True if uploaded."""
        dev, q = self.device, _remote_path
        if dev.run(f"test -f {q(art)}/.complete && echo yes || echo no", timeout=60).strip() == "yes":
            return False
        partial = f"{art}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # Unpacked beside its final name and renamed once complete; on any failure (a full disk, a dropped
        # connection: HUP) the shell removes the partial folder, so no half-copied artifact is ever used.
        dev.run(f"P={q(partial)}; trap 'rm -rf \"$P\"' EXIT; trap 'exit 1' HUP INT TERM PIPE; "
                f"mkdir -p \"$P\" && cd \"$P\" && tar -xf - && touch .complete && cd / && rm -rf {q(art)} && "
                f"mv \"$P\" {q(art)}", stdin=_tar(folder, names))
        return True


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _host_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def check_device(device: SshDevice) -> dict[str, Any]:
    """What ``slm-export devices check`` prints: reachable, CPU, memory, disk, Python and runtime versions."""
    probe = (
        "import json, os, platform, shutil\n"
        "out = {'hostname': platform.node(), 'machine': platform.machine(), 'python': platform.python_version(),"
        " 'cores': os.cpu_count()}\n"
        "try:\n    mem = open('/proc/meminfo').read().split()\n    out['memory_gb'] = round(int(mem[1]) / 2**20, 2)\n"
        "except Exception:\n    pass\n"
        "work = os.path.expanduser(os.environ.get('W', '~'))\nos.makedirs(work, exist_ok=True)\n"
        "out['free_disk_gb'] = round(shutil.disk_usage(work).free / 1e9, 2)\n"
        "for key in ('model name', 'Model', 'CPU part'):\n"
        "    for line in open('/proc/cpuinfo'):\n"
        "        if line.startswith(key):\n            out.setdefault('cpu', line.split(':', 1)[1].strip())\n"
        "runtimes = {}\n"
        "for mod, dist in (('onnxruntime', 'onnxruntime'), ('tvm', 'apache-tvm'), ('executorch', 'executorch'),"
        " ('numpy', 'numpy')):\n"
        "    try:\n        m = __import__(mod)\n        runtimes[dist] = getattr(m, '__version__', 'installed')\n"
        "    except Exception as exc:\n        runtimes[dist] = None\n"
        "out['runtimes'] = runtimes\nout['trtexec'] = shutil.which('trtexec')\nprint(json.dumps(out))\n"
    )
    workdir = device.url.workdir
    text = device.run(f"W={shlex.quote(workdir)} {shlex.quote(device.url.python)} -", stdin=probe.encode(),
                      timeout=60)
    try:
        return {"device": str(device.url), "reachable": True, **json.loads(text.strip().splitlines()[-1])}
    except (ValueError, IndexError):
        raise DeviceError(f"{device.url}: the device answered, but its Python did not run the probe: {text[-300:]}") \
            from None
