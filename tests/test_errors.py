"""Every failure is one line with its cause, never "internal error": OSErrors, hostile profiles, bad paths."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mtlsctl import files

from .conftest import run_cli, tree

pytestmark = pytest.mark.integration

ALIAS_BOMB = "".join(
    [
        'a: &a ["x","x","x","x","x","x","x","x","x"]\n',
        *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)  # about 436 bytes, 9**9 leaves when expanded


def _one_error(res, code: int, *needles: str) -> None:
    assert res.code == code, (res.code, res.out, res.err)
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    first = res.err.splitlines()[0]
    assert first.startswith("error: ") and all(n in first for n in needles), res.err


def test_a_regular_file_as_pki_dir_is_bad_input(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    _one_error(run_cli(["--pki-dir", str(f), "list"]), 2, str(f), "not a directory")
    _one_error(run_cli(["--pki-dir", str(f), "init", "--dry-run"]), 2, "not a directory")


def test_the_profile_alias_bomb_is_refused_quickly_and_briefly(tmp_path):
    """436 bytes of nested aliases once gave a 76 MB error message; one level more took 12 GB. Run it
    in a child with a 400 MB address-space limit: it must end in a short refusal, not a MemoryError."""
    prof = tmp_path / "bomb.yaml"
    prof.write_text(ALIAS_BOMB)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))\n"
        "from mtlsctl.cli import main\n"
        f"main(['--pki-dir', {str(tmp_path / 'pki')!r}, '--profile', {str(prof)!r}, 'list'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr[-500:])
    assert "nested YAML aliases" in res.stderr and len(res.stderr) < 400, res.stderr[-500:]


def test_duplicate_profile_keys_are_an_error_not_last_wins(tmp_path):
    prof = tmp_path / "dup.yaml"
    prof.write_text("crl:\n  days: 10\nclients:\n  days: 30\n  days: 3000\n")
    _one_error(run_cli(["--pki-dir", str(tmp_path / "p"), "--profile", str(prof), "list"]), 2,
               "duplicate key 'days' at line 5", "first at line 4")


def test_a_fifo_as_profile_does_not_hang(tmp_path):
    fifo = tmp_path / "profile.fifo"
    os.mkfifo(fifo)
    code = f"from mtlsctl.cli import main; main(['--pki-dir', {str(tmp_path / 'p')!r}, '--profile', {str(fifo)!r}, 'list'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "not a regular file" in res.stderr, res.stderr


def test_an_oversized_profile_and_a_huge_value_are_refused_with_a_short_message(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 40_000)
    _one_error(run_cli(["--pki-dir", str(tmp_path / "p"), "--profile", str(big), "list"]), 2, "larger than 256 KiB")
    long = tmp_path / "long.yaml"
    long.write_text('clients: {days: "' + "9" * 50_000 + '"}\n')
    res = run_cli(["--pki-dir", str(tmp_path / "p"), "--profile", str(long), "list"])
    _one_error(res, 2, "clients.days")
    assert len(res.err) < 600, len(res.err)


def test_out_of_space_while_writing_is_one_line_and_rolled_back(fast_pki, monkeypatch):
    """ENOSPC from a write mtlsctl does itself (the journal): exit 1, the reason, nothing left behind."""
    before = tree(fast_pki)
    real = files.atomic_write

    def full(path, data, mode=files.MODE_PUBLIC):
        if path.name == "journal.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, mode)

    monkeypatch.setattr(files, "atomic_write", full)
    res = run_cli(["--pki-dir", str(fast_pki), "add-client", "phone"])
    _one_error(res, 1, "No space left on device")
    assert "free some disk space" in res.err
    monkeypatch.setattr(files, "atomic_write", real)
    assert not (fast_pki / "certs/phone.crt").exists() and not (fast_pki / "private/phone.key").exists()
    after = tree(fast_pki)
    assert {k for k in after if not k.startswith(".mtlsctl")} == {k for k in before if not k.startswith(".mtlsctl")}


def test_a_user_who_cannot_write_the_pki_gets_one_line_not_a_bug_report(fast_pki):
    """EACCES (a non-root admin on a root-owned PKI): exit 1 with the path, in a forked child as nobody."""
    shared = Path(tempfile.mkdtemp(prefix="mtls-eacces-", dir="/tmp"))
    try:
        os.chmod(shared, 0o755)
        pki = shared / "pki"
        shutil.copytree(fast_pki, pki, symlinks=True)
        for path in [pki, *pki.rglob("*")]:  # readable, not writable, for others (as a 0755/0644 PKI would be)
            if path.is_dir() and path.name != "private":
                os.chmod(path, 0o755)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, run the CLI in-process, report (code, stderr) through the pipe
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
                res = run_cli(["--pki-dir", str(pki), "add-client", "phone"])
                os.write(w, f"{res.code}\n{res.err}".encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as fh:
            text = fh.read()
        os.waitpid(pid, 0)
        code, _, err = text.partition("\n")
        assert code == "1", text
        assert err.startswith("error: Permission denied") and str(pki) in err.splitlines()[0], err
        assert "internal error" not in err and "Traceback" not in err
        assert "run mtlsctl as the user that owns the PKI" in err
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_an_existing_directory_as_render_out_is_a_path_error(fast_pki, tmp_path):
    out = tmp_path / "conf.d"
    out.mkdir()
    res = run_cli(["--pki-dir", str(fast_pki), "nginx", "render", "--out", str(out)])
    assert res.code == 2 and "Traceback" not in res.err and "internal error" not in res.err, res.err
    assert stat.S_ISDIR(out.stat().st_mode)


@pytest.mark.parametrize("args", [
    ["add-client", "x", "--password-file", "/dev/zero"],
    ["export", "phone", "--force", "--out", "/dev/zero"],
    ["add-client", "--from-file", "/dev/zero"],
    ["backup", "--out", "BACKUP", "--passphrase-file", "/dev/zero"],
])
def test_endless_inputs_are_refused_without_filling_memory(fast_pki, tmp_path, args):
    """A device given where a small file belongs: one line, exit 2, in a child limited to 400 MB (once: an OOM)."""
    assert run_cli(["--pki-dir", str(fast_pki), "add-client", "phone"]).code == 0
    args = [str(tmp_path / "b.tgz") if a == "BACKUP" else a for a in args]
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))\n"
        "from mtlsctl.cli import main\n"
        f"main(['--pki-dir', {str(fast_pki)!r}, *{args!r}])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.returncode, res.stderr[-400:])
    assert res.stderr.startswith("error: ") and "MemoryError" not in res.stderr and "Traceback" not in res.stderr


def test_password_stdin_from_an_endless_pipe_is_refused(fast_pki):
    code = f"from mtlsctl.cli import main; main(['--pki-dir', {str(fast_pki)!r}, 'add-client', 'y', '--password-stdin'])"
    with open("/dev/zero", "rb") as zero:
        res = subprocess.run([sys.executable, "-c", code], stdin=zero, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "longer than" in res.stderr, res.stderr[-400:]
