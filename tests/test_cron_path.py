"""Under cron's PATH (/usr/bin:/bin) the profile's `nginx -t` still finds Debian's /usr/sbin/nginx: a revoke or a
CRL refresh from cron must reach nginx, or nginx keeps serving the old CRL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mtlsctl.runner import resolve_program

from .conftest import require_tool, set_profile


def test_a_bare_program_missing_from_path_is_found_in_sbin(monkeypatch):
    nginx = require_tool("nginx")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    if str(Path(nginx).parent) in ("/usr/bin", "/bin"):
        return  # nothing to look for elsewhere on this machine
    assert resolve_program("nginx") == nginx
    assert resolve_program("./nginx") == "./nginx" and resolve_program("no-such-program-x") == "no-such-program-x"


def test_nginx_check_under_crons_path(fast_pki):
    require_tool("nginx")
    set_profile(fast_pki, nginx={"test_command": "nginx -v"})
    code = f"from mtlsctl.cli import main; main(['--pki-dir', {str(fast_pki)!r}, 'nginx', 'check'])"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(Path(__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
