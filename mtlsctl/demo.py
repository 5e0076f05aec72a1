"""`mtlsctl demo`: the guide end to end on the built-in defaults, proven with a real nginx.

Builds a PKI in ./mtls-demo (CA, a `localhost` server certificate, clients iphone-jmrp (allowed),
guest (valid, not allowed) and lost-device (revoked), the CRL and the rendered site); when nginx is
installed, starts it on 127.0.0.1 with a tiny echo backend and checks the guide's four outcomes:
no certificate 400, iphone-jmrp 200, lost-device 400, guest 403. Re-running it is safe.

LocalNginx is also what the end-to-end tests use to run nginx in a temporary directory.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from http.client import HTTPSConnection
from pathlib import Path

from mtlsctl import client, db, lifecycle
from mtlsctl.ca import init_pki
from mtlsctl.errors import InputError, StateError
from mtlsctl.files import MODE_PUBLIC, atomic_write, check_owned_dir
from mtlsctl.nginx import render_site
from mtlsctl.pki import DIRS, PROFILE_NAME, Pki, Settings
from mtlsctl.profile import Profile, dump_profile, load_profile
from mtlsctl.runner import Runner, run_argv, spawn
from mtlsctl.templates import render_file

SERVER = "localhost"
ALLOWED, GUEST, LOST = "iphone-jmrp", "guest", "lost-device"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


class LocalNginx:
    """An nginx of our own under `prefix` (its own pid file, logs and temp dirs), on loopback."""

    def __init__(self, prefix: Path, binary: str | None = None) -> None:
        self.prefix = prefix
        self.binary = binary or nginx_binary() or "nginx"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    def argv(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.prefix}/", "-c", "nginx.conf", *extra]

    def test_command(self) -> str:
        return shlex.join(self.argv("-t", "-q"))

    def reload_command(self) -> str:
        return shlex.join(self.argv("-s", "reload"))

    def nginx_section(self, pki: Path, port: int, backend_port: int, server: str = SERVER) -> dict[str, object]:
        """The profile's nginx: section for a site served by this local nginx on 127.0.0.1:port."""
        return {
            "server_name": server, "listen": f"127.0.0.1:{port}",
            "server_cert": str(pki / f"certs/{server}.crt"), "server_key": str(pki / f"private/{server}.key"),
            "upstream": f"http://127.0.0.1:{backend_port}",
            "access_log": str(self.prefix / "logs/access.log"), "error_log": str(self.prefix / "logs/site.error.log"),
            "test_command": self.test_command(), "reload_command": self.reload_command(), "pid_file": str(self.pid_file),
        }

    def write(self, site_conf: str) -> None:
        for sub in ("logs", "tmp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        user = ""
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("www-data")
                user = "user www-data;\n"
            except KeyError:
                user = "user nobody nogroup;\n"
        atomic_write(self.prefix / "nginx.conf",
                     render_file("nginx/demo-nginx.conf.template", {"prefix": str(self.prefix), "user": user}), MODE_PUBLIC)
        atomic_write(self.prefix / "site.conf", site_conf, MODE_PUBLIC)

    def master(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def start(self, port: int) -> None:
        self.stop()
        run_argv(self.argv())  # nginx daemonizes; the master writes the pid file
        if not wait_for_port(port):
            tail = self.error_log.read_text(errors="replace").splitlines()[-3:] if self.error_log.exists() else []
            raise StateError(f"nginx did not start listening on 127.0.0.1:{port}: {' | '.join(tail)}")

    def stop(self, timeout: float = 10.0) -> None:
        pid = self.master()
        if pid is None:
            return
        run_argv(self.argv("-s", "stop"), check=False)  # fast shutdown: this nginx is ours
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        if _running(pid):
            os.kill(pid, signal.SIGTERM)


def _running(pid: int) -> bool:
    """True while the process runs; an exited one that its parent has not reaped yet (a zombie) has stopped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start_backend(port: int, pid_file: Path, log: Path) -> int:
    proc = spawn([sys.executable, "-m", "mtlsctl.demo_backend", str(port)], log=log)
    atomic_write(pid_file, f"{proc.pid}\n", MODE_PUBLIC)
    if not wait_for_port(port):
        raise StateError(f"the demo backend did not start on 127.0.0.1:{port} (see {log})")
    return proc.pid


def stop_backend(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass


@dataclass
class Case:
    label: str
    client: str | None
    expected: int
    status: int | None = None
    body: str = ""
    command: str = ""

    @property
    def ok(self) -> bool:
        return self.status == self.expected and (self.expected != 200 or f"CN={ALLOWED}" in self.body)


@dataclass
class DemoReport:
    pki_dir: Path
    port: int
    nginx_ran: bool
    kept: bool
    cases: list[Case] = field(default_factory=list)
    stop_hint: str = ""
    created: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)


def https_get(pki: Path, port: int, name: str | None) -> tuple[int, str]:
    """One HTTPS request as the named client (or none), trusting only the demo CA."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca/ca.crt"))
    if name:
        ctx.load_cert_chain(str(pki / f"certs/{name}.crt"), str(pki / f"private/{name}.key"))
    conn = HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def curl_command(port: int, name: str | None) -> list[str]:
    argv = ["curl", "--cacert", "ca/ca.crt"]
    if name:
        argv += ["--cert", f"certs/{name}.crt", "--key", f"private/{name}.key"]
    return [*argv, f"https://127.0.0.1:{port}/"]


def demo_profile(base: Profile, pki: Path, port: int, backend_port: int, local: LocalNginx) -> Profile:
    data = base.model_dump(mode="json")
    data["pki_dir"] = str(pki)
    data["nginx"] = {**local.nginx_section(pki, port, backend_port), "allow": [f"CN={ALLOWED}"]}
    return Profile.model_validate(data)


def check_port(port: int | None) -> int | None:
    """`demo --port N`: an unprivileged port, or None for a free one. Raises InputError."""
    if port is not None and not 1024 <= port <= 65535:
        raise InputError(f"--port {port} is out of range", hint="use 1024..65535, or leave it out for a free port")
    return port


# What the demo writes into (besides the PKI's own layout): a directory another user controls is refused.
DEMO_DIRS = ("nginx", "nginx/logs", "nginx/tmp")
# Files of an existing demo that make the demo (or the openssl and nginx it runs) load code or run commands.
DEMO_FILES = (PROFILE_NAME, "openssl.cnf", "nginx/nginx.conf", "nginx/site.conf")


def refuse_foreign_demo(root: Path) -> None:
    """An existing demo directory is reused only when it is ours: it, every directory the demo writes into and
    the files that load code (openssl.cnf can load a provider module; mtls.yaml names nginx's commands) must be
    owned by the euid and not group/other-writable, and no link may stand where a directory belongs.

    Raises:
        InputError: naming the directory or file and the fix.
    """
    if check_owned_dir(root, "the demo directory", follow=True) is None:
        return
    for rel in (*DIRS, *DEMO_DIRS):
        check_owned_dir(root / rel, "the demo's directory")
    for rel in DEMO_FILES:
        try:
            st = os.lstat(root / rel)
        except FileNotFoundError:
            continue
        if not os.path.isfile(root / rel) or os.path.islink(root / rel) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise InputError(f"{root / rel} of the existing demo is not a regular file of yours that only you can write "
                             "(another user may have built this demo)",
                             hint=f"remove {root} to start the demo afresh, or give another directory")


def run_demo(directory: Path, port: int | None, keep: bool, runner: Runner) -> DemoReport:
    """Build (or reuse) the demo PKI, then run nginx and the guide's four checks when nginx exists."""
    root = directory.absolute()
    refuse_foreign_demo(root)  # before its profile is read or anything is written there
    pki = Pki(root)
    local = LocalNginx(root / "nginx")
    port = port or free_port()
    backend_port = free_port()
    base = load_profile(root / PROFILE_NAME) if (root / PROFILE_NAME).exists() else Profile()
    profile = demo_profile(base, root, port, backend_port, local)
    settings = Settings(pki, profile, "mtlsctl demo")
    report = DemoReport(root, port, nginx_ran=False, kept=keep)

    if not pki.has_ca():
        init_pki(settings, runner)
        report.created.append("CA (ca/ca.crt, private/ca.key)")
    else:
        atomic_write(pki.path(PROFILE_NAME), dump_profile(profile, root), MODE_PUBLIC)
    if not pki.path(f"certs/{SERVER}.crt").exists():
        req = client.build_request(settings, SERVER, sans=[f"DNS:{SERVER}", "IP:127.0.0.1"], kind="server")
        client.issue_client(settings, req, runner)
        report.created.append(f"server certificate certs/{SERVER}.crt")
    for name in (ALLOWED, GUEST, LOST):
        if not pki.path(f"certs/{name}.crt").exists():
            client.issue_client(settings, client.build_request(settings, name), runner)
            report.created.append(f"client {name}")
    lifecycle.revoke(settings, name=LOST, serial_hex=None, why="keyCompromise", runner=runner)
    for name in (ALLOWED, GUEST):  # changed by hand since the last run (revoked, say): the outcomes will differ
        if not any(r.is_active() for r in db.rows_named(pki.path(pki.index), name)):
            report.notes.append(f"{name} has no valid certificate any more in {root} (revoked by hand?); "
                                f"remove {root} to start the demo afresh")
    site, _warnings = render_site(pki, profile.nginx)
    local.write(site)

    report.cases = [
        Case("no certificate", None, 400),
        Case(f"{ALLOWED} (allowed)", ALLOWED, 200),
        Case(f"{LOST} (revoked)", LOST, 400),
        Case(f"{GUEST} (valid, not allowed)", GUEST, 403),
    ]
    for case in report.cases:
        case.command = f"cd {shlex.quote(str(root))} && " + shlex.join(curl_command(port, case.client))
    if nginx_binary() is None:
        return report

    backend_pid_file = local.prefix / "backend.pid"
    stop_backend(backend_pid_file)
    start_backend(backend_port, backend_pid_file, local.prefix / "logs/backend.log")
    try:
        local.start(port)
        report.nginx_ran = True
        for case in report.cases:
            try:
                case.status, case.body = https_get(root, port, case.client)
            except (OSError, ssl.SSLError) as exc:
                case.body = f"{type(exc).__name__}: {exc}"
    finally:
        if not keep:
            local.stop()
            stop_backend(backend_pid_file)
    report.stop_hint = (f"{shlex.join(local.argv('-s', 'quit'))}; kill $(cat {shlex.quote(str(backend_pid_file))})")
    return report
