"""An OpenSSH server on localhost for the SSH tunnel tests: Debian's ``sshd`` on a free port, with a host key
and an authorized client key made in a temporary directory and its own config file (no system configuration
is read or changed). Needs root (``sshd`` logs in as this user) and ``openssh-server``
(``scripts/test.sh`` installs it where CI is set). Without them the tests are skipped; where CI is set they
fail instead. The server's process group is killed when the fixture ends, so no session outlives it."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without its privilege separation directory


@dataclass(frozen=True)
class SSHLogin:
    host: str
    port: int
    user: str
    identity: Path
    log: Path  # sshd's log (LogLevel VERBOSE: one "Starting session" line per command or SFTP session)
    client_bin: Path  # `ssh` that knows the server's host key (NeMo-Run's rsync runs the OpenSSH client)

    def env(self) -> dict[str, str]:
        """The workstation's environment: its ``ssh`` knows the login node, as a user's ``known_hosts`` does."""
        return {**os.environ, "PATH": f"{self.client_bin}:{os.environ['PATH']}"}

    def overrides(self) -> list[str]:
        return [f"cluster.ssh.host={self.host}", f"cluster.ssh.port={self.port}", f"cluster.ssh.user={self.user}",
                f"cluster.ssh.identity={self.identity}"]

    def sessions(self, kind: str) -> int:
        """How many ``command`` or ``subsystem 'sftp'`` sessions the server has started so far."""
        return self.log.read_text().count(f"Starting session: {kind} for {self.user}")


def _problem() -> str | None:
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install openssh-server)"
    if os.geteuid() != 0:
        return "not root (sshd logs in as the user it runs as only when started by root)"
    missing = [tool for tool in ("ssh-keygen", "ssh", "rsync") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (NeMo-Run copies job files with rsync over ssh)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _client(home: Path, port: int) -> Path:
    """A directory with an ``ssh`` that checks the server against its own known-hosts file (the user's is left
    alone)."""
    known_hosts = home / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {(home / 'host_key.pub').read_text()}")
    client = home / "bin"
    client.mkdir()
    (client / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -o UserKnownHostsFile={known_hosts} '
                                '-o StrictHostKeyChecking=yes "$@"\n')
    (client / "ssh").chmod(0o755)
    return client


@pytest.fixture(scope="session")
def ssh_login(tmp_path_factory):
    problem = _problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"no SSH server for the tunnel tests: {problem} -- CI must run them", pytrace=False)
        pytest.skip(f"no SSH server for the tunnel tests: {problem}")
    home = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True)
    (home / "authorized_keys").write_text((home / "client_key.pub").read_text())
    port = _free_port()
    config = home / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {home / 'host_key'}
PidFile {home / 'sshd.pid'}
AuthorizedKeysFile {home / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
LogLevel VERBOSE
Subsystem sftp internal-sftp
""")
    made_privsep = not PRIVSEP_DIR.exists()
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log = home / "sshd.log"
    with open(log, "w") as out:
        server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while "Server listening" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start (exit {server.poll()}): {log.read_text()[-500:]}")
            time.sleep(0.05)
        yield SSHLogin("127.0.0.1", port, pwd.getpwuid(os.geteuid()).pw_name, home / "client_key", log,
                       _client(home, port))
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the listener and every session it forked (its own group)
        server.wait(timeout=30)
        if made_privsep:
            PRIVSEP_DIR.rmdir()
