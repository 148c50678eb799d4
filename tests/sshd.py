"""A real OpenSSH server on loopback, for the device tests: throwaway host and user keys, a free port,
and a "device" Python environment holding only NumPy and ONNX Runtime (no torch, no slm_export)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class Sshd:
    root: Path
    port: int
    key: Path  # the user's private key (its public half is authorized)
    known_hosts: Path  # holds this server's host key
    python: Path  # the device's Python
    proc: subprocess.Popen | None = None  # type: ignore[type-arg]

    def url(self, workdir: Path | None = None, python: str | None = None) -> str:
        return (f"ssh://{os.environ.get('USER') or 'root'}@127.0.0.1:{self.port}"
                f"?workdir={workdir or self.root / 'remote'}&python={python or self.python}")

    def start(self) -> None:
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("sshd did not start")

    def stop(self) -> None:
        """Kill the server and every session it serves (a device that went away mid-run)."""
        if self.proc is None:
            return
        try:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            if p.name().startswith("sshd"):
                p.kill()
        self.proc.wait(timeout=10)
        self.proc = None


def start_sshd(root: Path) -> Sshd:
    root.mkdir(parents=True, exist_ok=True)
    _keygen(root / "host_ed25519")
    _keygen(root / "user_ed25519")
    shutil.copy(root / "user_ed25519.pub", root / "authorized_keys")
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_ed25519'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        "UsePAM no\nStrictModes no\nLogLevel ERROR\n")
    host_pub = (root / "host_ed25519.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    server = Sshd(root, port, root / "user_ed25519", root / "known_hosts", _device_python(root))
    server.start()
    return server


def _device_python(root: Path) -> Path:
    """A venv with the host's numpy and onnxruntime versions only."""
    from importlib.metadata import version

    env = root / "device-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), f"numpy=={version('numpy')}", f"onnxruntime=={version('onnxruntime')}",
                    "flatbuffers", "packaging", "protobuf", "coloredlogs", "humanfriendly", "sympy", "mpmath"],
                   check=True, capture_output=True)
    return env / "bin" / "python"
