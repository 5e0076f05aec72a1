"""A CLI that meets people's habits (issue 13): global options before or after the command, shell completion,
"did you mean", every problem of a names file at once, choice values in any case, refusals that name the
character, one subject format (RFC 2253, as nginx shows it), and a reload that fails on a host without
systemd said as such (the revocation stands)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from mtlsctl import _click as click  # the click typer parses with (typer >= 0.26 ships its own)
from mtlsctl import cli, db
from mtlsctl.errors import InputError

from .conftest import openssl, set_profile, tree

ROOT = Path(__file__).resolve().parent.parent
GLOBALS_AFTER = ["--pki-dir", "/srv/pki-x", "--profile", "/srv/site-x.yaml", "--debug",
                 "--ca-passphrase-file", "/srv/pass-x", "--ca-passphrase-fd", "7"]


def run_keeping_state(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str, cli.CliState]:
    """Run main() in-process with a CliState of our own, to look at what the global callback parsed into it
    (the CLI keeps no module globals: each run's options live in the state main() hands to click)."""
    state = cli.CliState()
    old_umask = os.umask(0o022)
    try:
        with pytest.raises(SystemExit) as exited:
            cli.main(args, state=state)
    finally:
        os.umask(old_umask)
    out, err = capsys.readouterr()
    return exited.value.code, out, err, state


def command_paths(command: click.Command | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    command = command or cli.build_command()
    out = []
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        out.append((*prefix, name))
        out.extend(command_paths(sub, (*prefix, name)))
    return out


PATHS = command_paths()


def _own_options(path: tuple[str, ...]) -> set[str]:
    command: Any = cli.build_command()
    for part in path:
        command = command.commands[part]
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts}


def _assert_globals_reached_the_callback(opts: cli.CliState, own: set[str] = frozenset()) -> None:
    """Each global option reached the callback, except one the command has itself (restore --pki-dir)."""
    got = {"--pki-dir": str(opts.pki_dir), "--profile": str(opts.profile), "--debug": opts.debug,
           "--ca-passphrase-file": str(opts.ca_passphrase_file), "--ca-passphrase-fd": opts.ca_passphrase_fd}
    want = {"--pki-dir": "/srv/pki-x", "--profile": "/srv/site-x.yaml", "--debug": True,
            "--ca-passphrase-file": "/srv/pass-x", "--ca-passphrase-fd": 7}
    assert set(got) == set(cli.global_options(cli.build_command()))
    assert {k: v for k, v in got.items() if k not in own} == {k: v for k, v in want.items() if k not in own}


# ------------------------------------------------------------------ 1. global options before or after the command


def test_every_command_is_covered():
    assert len(PATHS) > 20 and ("add-client",) in PATHS and ("nginx", "render") in PATHS and ("completion",) in PATHS


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_global_options_after_the_command_for_every_command(capsys, path):
    code, out, err, state = run_keeping_state([*path, "--help", *GLOBALS_AFTER], capsys)
    assert code == 0, err
    assert f"Usage: mtlsctl {' '.join(path)}" in " ".join(out.split())
    _assert_globals_reached_the_callback(state, _own_options(path))


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_global_options_before_the_command_for_every_command(capsys, path):
    code, _, err, state = run_keeping_state([*GLOBALS_AFTER, *path, "--help"], capsys)
    assert code == 0, err
    _assert_globals_reached_the_callback(state)


def test_runs_in_one_process_share_no_options(capsys):
    """The parsed options belong to one run: a second run without them starts from the defaults."""
    _, _, _, first = run_keeping_state([*GLOBALS_AFTER, "list", "--help"], capsys)
    _, _, _, second = run_keeping_state(["list", "--help"], capsys)
    assert first.debug is True and str(first.pki_dir) == "/srv/pki-x"
    assert second == cli.CliState()


def test_global_options_after_the_command_act(fast_pki, mtls, tmp_path):
    assert mtls(["add-client", "alice", "--pki-dir", str(fast_pki)]).code == 0
    for args in (["list", "--json", "--pki-dir", str(fast_pki)], ["list", f"--pki-dir={fast_pki}", "--json"]):
        res = mtls(args)
        assert res.code == 0, res.err
        assert [e["name"] for e in json.loads(res.out)] == ["alice"]
    # a nested command, and the PKI's own profile read through it
    set_profile(fast_pki, nginx={"test_command": "echo the-pki-profile-was-read"})
    res = mtls(["nginx", "check", "--pki-dir", str(fast_pki)])
    assert res.code == 0 and "the-pki-profile-was-read" in res.out, res.err
    # --profile after the command, with init --dry-run
    prof = tmp_path / "site.yaml"
    prof.write_text("ca:\n  subject: {CN: After The Command CA}\n  key: {type: ec}\n")
    res = mtls(["init", "--dry-run", "--pki-dir", str(tmp_path / "new"), "--profile", str(prof)])
    assert res.code == 0, res.err
    assert "ec_paramgen_curve:P-384" in res.out  # the profile's EC CA (the default is RSA 4096)
    assert f"profile: {prof}" in res.err and str(tmp_path / "new") in res.err


def test_an_option_value_spelled_like_a_global_option_stays_a_value(fast_pki, mtls, capsys):
    before = tree(fast_pki)
    res = mtls(["add-client", "--from-file", "--pki-dir", "--pki-dir", str(fast_pki)])
    assert res.code == 2 and "cannot read --from-file --pki-dir" in res.err, res.err
    # after `--` nothing is an option: --debug is the NAME, refused as a name
    res = mtls(["add-client", "--pki-dir", str(fast_pki), "--", "--debug"])
    assert res.code == 2 and "name '--debug'" in res.err, res.err
    code, _, err, state = run_keeping_state(["add-client", "--pki-dir", str(fast_pki), "--", "--debug"], capsys)
    assert code == 2 and "name '--debug'" in err and state.debug is False
    assert tree(fast_pki) == before


def test_a_global_option_without_its_value_after_the_command(mtls):
    res = mtls(["list", "--pki-dir"])
    assert res.code == 2 and "'--pki-dir' requires an argument" in res.err, res.err


def test_environment_variables_still_work(fast_pki, mtls, monkeypatch, tmp_path):
    monkeypatch.setenv("PKI_DIR", str(fast_pki))
    res = mtls(["list", "--json"])
    assert res.code == 0 and json.loads(res.out) == []
    prof = tmp_path / "env.yaml"
    prof.write_text("ca:\n  subject: {CN: From The Environment CA}\n  key: {type: ec}\n")
    monkeypatch.setenv("MTLSCTL_PROFILE", str(prof))
    res = mtls(["init", "--dry-run", "--pki-dir", str(tmp_path / "p2")])
    assert res.code == 0 and "ec_paramgen_curve:P-384" in res.out and f"profile: {prof}" in res.err, res.err
    # a global option after the command beats the environment, as before it does
    res = mtls(["list", "--json", "--pki-dir", str(tmp_path / "nowhere")])
    assert res.code != 0 and "nowhere" in res.err


def test_version_and_help_keep_working(mtls):
    from mtlsctl import __version__

    assert mtls(["--version"]).out.strip() == f"mtlsctl {__version__}"
    res = mtls(["list", "--help"])
    assert res.code == 0 and "--expiring-within" in res.out
    res = mtls([])
    assert "Usage: mtlsctl" in " ".join((res.out + res.err).split())


@pytest.mark.parametrize("args,expected", [
    (["add-client", "x", "--pki-dir", "D"], ["--pki-dir", "D", "add-client", "x"]),
    (["--debug", "nginx", "render", "--profile=P", "--out", "F"], ["--debug", "--profile=P", "nginx", "render", "--out", "F"]),
    (["nginx", "--pki-dir", "D", "render"], ["--pki-dir", "D", "nginx", "render"]),
    (["export", "x", "--out", "--pki-dir"], ["export", "x", "--out", "--pki-dir"]),            # a value of --out
    (["restore", "f", "--pki-dir", "D", "--debug"], ["--debug", "restore", "f", "--pki-dir", "D"]),  # restore's own
    (["list", "--", "--pki-dir", "D"], ["list", "--", "--pki-dir", "D"]),
    (["--pki-dir", "list", "list", "--debug"], ["--pki-dir", "list", "--debug", "list"]),      # root option's value
    (["nosuch", "--pki-dir", "D"], ["nosuch", "--pki-dir", "D"]),                             # click refuses it
    (["nginx", "nosuch", "--pki-dir", "D"], ["nginx", "nosuch", "--pki-dir", "D"]),
    (["add-client", "--san", "--debug", "x"], ["add-client", "--san", "--debug", "x"]),
    (["--", "list", "--debug"], ["--", "list", "--debug"]),
])
def test_hoisting_walks_arguments_as_click_parses_them(args, expected):
    assert cli.hoist_global_options(cli.build_command(), args) == expected


# ------------------------------------------------------------------ 2. shell completion


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_for_each_shell(mtls, shell):
    res = mtls(["completion", shell])
    assert res.code == 0, res.err
    assert f"_MTLSCTL_COMPLETE=complete_{shell}" in res.out and "mtlsctl" in res.out
    if shell == "zsh":
        assert res.out.startswith("#compdef mtlsctl")
    checker = shutil.which(shell)
    if checker:  # syntax-check it with the shell itself where the shell is installed
        with_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"mtlsctl-completion-test.{shell}"
        with_file.write_text(res.out)
        try:
            assert subprocess.run([checker, "-n", str(with_file)], capture_output=True).returncode == 0
        finally:
            with_file.unlink()
    assert mtls(["completion", shell.upper()]).out == res.out  # the shell name in any case too


def test_completion_refuses_an_unknown_shell(mtls):
    res = mtls(["completion", "tcsh"])
    assert res.code == 2 and "'tcsh'" in res.err and "bash, zsh or fish" in res.err


def _bash_complete(tmp_path: Path, script: str, words: list[str]) -> list[str]:
    """Complete in a real bash: the script's function, run on COMP_WORDS/COMP_CWORD, calls `mtlsctl`."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "mtlsctl"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mtlsctl "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "completion.bash").write_text(script)
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (f"source {tmp_path / 'completion.bash'}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
               "_mtlsctl_completion mtlsctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("_MTLSCTL_COMPLETE", None)
    res = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line]


def test_bash_completes_commands_subcommands_options_and_choices(mtls, tmp_path):
    script = mtls(["completion", "bash"]).out
    assert _bash_complete(tmp_path, script, ["mtlsctl", "add-c"]) == ["add-client"]
    assert set(_bash_complete(tmp_path, script, ["mtlsctl", "nginx", "re"])) == {"render", "reload"}
    assert "--dry-run" in _bash_complete(tmp_path, script, ["mtlsctl", "revoke", "--dr"])
    assert _bash_complete(tmp_path, script, ["mtlsctl", "add-client", "x", "--key-type", ""]) == ["rsa", "ec"]
    assert _bash_complete(tmp_path, script, ["mtlsctl", "revoke", "x", "--reason", "key"]) == ["keyCompromise"]


def test_completion_install_writes_once_and_never_overwrites_without_force(mtls, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "BASH_COMPLETION_USER_DIR", "ZDOTDIR"):
        monkeypatch.delenv(var, raising=False)
    places = {"bash": ".local/share/bash-completion/completions/mtlsctl", "zsh": ".zfunc/_mtlsctl",
              "fish": ".config/fish/completions/mtlsctl.fish"}
    for shell, rel in places.items():
        target = tmp_path / rel
        res = mtls(["completion", shell, "--install"])
        assert res.code == 0 and str(target) in res.out, res.err
        assert target.read_text() == mtls(["completion", shell]).out
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert "already installed" in mtls(["completion", shell, "--install"]).out
        target.write_text("# the user's own completion\n")
        res = mtls(["completion", shell, "--install"])
        assert res.code == 2 and "--force" in res.err and str(target) in res.err
        assert target.read_text() == "# the user's own completion\n"
        assert mtls(["completion", shell, "--install", "--force"]).code == 0
        assert target.read_text() == mtls(["completion", shell]).out
    assert not (tmp_path / ".bashrc").exists() and not (tmp_path / ".zshrc").exists()  # no rc file edited
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert cli.completion_file("fish") == tmp_path / "xdg/fish/completions/mtlsctl.fish"


# ------------------------------------------------------------------ 3. did you mean


@pytest.mark.parametrize("args,suggestion", [
    (["add-clint", "x"], "Did you mean 'add-client'?"),
    (["nginx", "rendr"], "Did you mean 'render'?"),
    (["add"], "Did you mean 'add-client' or 'add-server'?"),
    (["add-client", "x", "--dayz", "3"], "Did you mean --days?"),
    (["list", "--pki-dri", "x"], "Did you mean --pki-dir?"),     # a global option, after the command
    (["--pki-dri", "x", "list"], "Did you mean --pki-dir?"),
    (["revoke", "x", "--dry"], "Did you mean --dry-run?"),
])
def test_did_you_mean_one_line_exit_2(mtls, args, suggestion):
    res = mtls(args)
    assert res.code == 2
    assert res.err.strip().splitlines() == [res.err.strip()], res.err
    assert res.err.startswith("error: No such ") and res.err.strip().endswith(suggestion), res.err


def test_without_a_close_name_the_hint_says_where_to_look(mtls):
    res = mtls(["add-client", "--zzz-qqq"])
    # click < 8.5 (and typer's own copy) says "No such option: --zzz-qqq", click 8.5 "No such option '--zzz-qqq'."
    assert res.code == 2 and re.search(r"No such option:? '?--zzz-qqq", res.err) and "mtlsctl add-client --help" in res.err
    res = mtls(["zzzzzz"])
    assert res.code == 2 and "No such command 'zzzzzz'" in res.err and "Did you mean" not in res.err


# ------------------------------------------------------------------ 4. every problem of a names file at once


def test_from_file_reports_every_problem_with_its_line(fast_pki, mtls, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("ok-1\n../evil\n# a comment\nok-2\n-rf\nOK-1\nsp ace  # trailing comment\nok-3\nok-2\n")
    before = tree(fast_pki)
    res = mtls(["add-client", "--from-file", str(names), "--pki-dir", str(fast_pki)])
    assert res.code == 2, res.err
    assert "5 problems" in res.err
    for needle in ("line 2: name '../evil'", "line 5: name '-rf'", "line 6: 'OK-1' is listed twice (first on line 1",
                   "line 7: name 'sp ace'", "line 9: 'ok-2' is listed twice (first on line 4"):
        assert needle in res.err, res.err
    assert tree(fast_pki) == before


def test_read_names_one_problem_stays_one_line():
    from mtlsctl.client import read_names

    with pytest.raises(InputError) as err:
        read_names("ok\n../x\n")
    assert err.value.message.startswith("line 2: ") and "\n" not in err.value.message
    assert read_names("a\n\n# c\nb  # d\n") == ["a", "b"]


# ------------------------------------------------------------------ 5. choice values in any case


def choice_options() -> list[tuple[str, str]]:
    """(command path, option) for every option of every command that takes one of a fixed set of values."""
    out = []

    def walk(command: click.Command, path: str) -> None:
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag:
                name = param.opts[0]
                if name in cli.CHOICES or re.fullmatch(r"[A-Za-z0-9-]+(\|[A-Za-z0-9-]+)+", param.metavar or ""):
                    out.append((path, name))
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {sub_name}".strip())

    walk(cli.build_command(), "")
    return sorted(out)


def test_every_choice_option_is_known_and_matches_the_core():
    from mtlsctl import lifecycle, profile

    found = choice_options()
    assert {opt for _, opt in found} <= set(cli.CHOICES), found  # an a|b metavar without a CHOICES entry
    assert {"--key-type", "--p12", "--status", "--reason", "--verify-client"} <= {opt for _, opt in found}
    assert cli.CHOICES["--reason"] == tuple(lifecycle.REASONS)
    assert cli.CHOICES["--status"] == tuple(lifecycle.STATUSES)
    assert cli.CHOICES["--p12"] == get_args(profile.ClientsProfile.model_fields["p12"].annotation)
    assert cli.CHOICES["--key-type"] == get_args(profile.KeySpec.model_fields["type"].annotation)
    assert cli.CHOICES["--verify-client"] == get_args(profile.NginxProfile.model_fields["verify_client"].annotation)


@pytest.mark.parametrize("path,option", choice_options())
def test_every_choice_option_takes_any_case_and_hands_on_one_spelling(path, option):
    root = cli.build_command()
    command: Any = root
    for part in path.split():
        command = command.commands[part]
    param = next(p for p in command.params if isinstance(p, click.Option) and option in p.opts)
    ctx = click.Context(command, info_name=path)
    for canonical in cli.CHOICES[option]:
        for typed in (canonical.upper(), canonical.lower(), canonical.swapcase()):
            assert param.process_value(ctx, typed) == canonical
    assert param.process_value(ctx, "no-such-value") == "no-such-value"  # left for the core to refuse, by name


def test_choice_values_in_any_case_end_to_end(fast_pki, mtls):
    pki = str(fast_pki)
    res = mtls(["add-client", "x", "--key-type", "RSA", "--p12", "Legacy", "--dry-run", "--pki-dir", pki])
    assert res.code == 0, res.err
    assert "genrsa" in res.out and "-legacy" in res.out
    res = mtls(["add-server", "web", "--key-type", "Ec", "--dry-run", "--pki-dir", pki])
    assert res.code == 0 and "-algorithm EC" in res.out, res.err
    assert mtls(["add-client", "alice", "--pki-dir", pki]).code == 0
    res = mtls(["export", "alice", "--p12", "MODERN", "--dry-run", "--pki-dir", pki])
    assert res.code == 0 and "pkcs12 -export" in res.out and "-legacy" not in res.out, res.err
    res = mtls(["revoke", "alice", "--reason", "KEYCOMPROMISE", "--dry-run", "--pki-dir", pki])
    assert res.code == 0 and "-crl_reason keyCompromise" in res.out, res.err
    res = mtls(["list", "--status", "VALID", "--json", "--pki-dir", pki])
    assert res.code == 0 and [e["status"] for e in json.loads(res.out)] == ["valid"], res.err
    res = mtls(["nginx", "render", "--verify-client", "OPTIONAL", "--pki-dir", pki])
    assert "--verify-client" not in res.err, res.err
    if res.code == 0:
        assert "ssl_verify_client optional;" in res.out
    res = mtls(["add-client", "y", "--key-type", "DSA", "--pki-dir", pki])
    assert res.code == 2 and "'DSA'" in res.err  # a wrong value is still named as typed


# ------------------------------------------------------------------ 6. refusals name the character; RFC 2253 subjects


@pytest.mark.parametrize("cn,needles", [
    ("Bob's CA", ["ca.subject.CN", "the apostrophe (')", "position 4", "reads it as a quote"]),
    ('say "hi"', ['the double quote (")', "position 5"]),
    ("a`b", ["the backtick (`)", "position 2"]),
    ("a$b", ["'$' at position 2", "variable"]),
    ("Lab # CA", ["'#' at position 5", "comment"]),
    ("a\\b", ["'\\\\' at position 2", "escape"]),
    ("tab\there", ["a tab ('\\t') at position 4"]),
    ("bell\x07", ["the control character '\\x07' (U+0007) at position 5"]),
])
def test_a_subject_refusal_names_the_character_its_position_and_why(mtls, tmp_path, cn, needles):
    prof = tmp_path / "p.yaml"
    prof.write_text(json.dumps({"ca": {"subject": {"CN": cn}}}))  # JSON is YAML: any character, exactly
    res = mtls(["init", "--dry-run", "--pki-dir", str(tmp_path / "pki"), "--profile", str(prof)])
    assert res.code == 2 and res.err.count("\n") == 1, res.err
    for needle in needles:
        assert needle in res.err, res.err
    assert ' "\'"' not in res.err  # not the bare repr the issue quotes


def test_nginx_refusals_name_quotes_in_words(mtls, tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text(json.dumps({"nginx": {"server_name": "a'b", "allow": ['CN=a"b']}}))
    res = mtls(["init", "--dry-run", "--pki-dir", str(tmp_path / "pki"), "--profile", str(prof)])
    assert res.code == 2
    assert "server_name contains the apostrophe (')" in res.err and "contains the double quote (\")" in res.err, res.err


def test_list_json_subjects_are_rfc2253_as_openssl_prints_them(fast_pki, mtls):
    for name in ("alice", "bob.example"):
        assert mtls(["add-client", name, "--pki-dir", str(fast_pki)]).code == 0
    assert mtls(["add-server", "web.example", "--pki-dir", str(fast_pki)]).code == 0
    entries = json.loads(mtls(["list", "--json", "--pki-dir", str(fast_pki)]).out)
    assert entries
    for e in entries:
        shown = openssl("x509", "-in", str(fast_pki / f"newcerts/{e['serial']}.pem"), "-noout", "-subject",
                        "-nameopt", "RFC2253").stdout.strip().removeprefix("subject=")
        assert e["subject"] == shown == f"CN={e['name']}"


# Subjects mtlsctl never issues, signed by `openssl ca` itself: the conversion must match openssl's own RFC 2253.
HOSTILE_SUBJECTS = [
    "/CN=plain",
    "/C=ES/ST=Valencia/O=Lab/OU=Infra/CN=Lab Root CA",
    "/O=A\\/B, Inc./CN=slash and comma",
    "/O=semi;colon<lt>gt\"quote/CN=x",
    "/CN=#hash first",
    "/CN= space first",
    "/CN=trailing space ",
    "/CN=plus\\+sign",
    "/CN=equals=sign",
    "/CN=back\\\\slash",
    "/O=Val\u00e8ncia \u00fc\u20ac/CN=utf8",
    "/OU=x+O=multi/CN=valued",
]


def test_rfc2253_conversion_matches_openssl_for_hostile_subjects(tmp_path):
    ca = tmp_path / "ca"
    (ca / "newcerts").mkdir(parents=True)
    (ca / "index.txt").write_text("")
    (ca / "serial").write_text("1000\n")
    (ca / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\ndir = .\ndatabase = index.txt\nnew_certs_dir = newcerts\nserial = serial\n"
        "default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n"
        "[req]\ndistinguished_name = dn\n[dn]\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-subj", "/CN=Conversion Test CA", "-days", "2", cwd=ca)
    for i, subject in enumerate(HOSTILE_SUBJECTS):
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{i}.key",
                "-out", f"{i}.csr", "-utf8", "-multivalue-rdn", "-subj", subject, cwd=ca)
        openssl("ca", "-batch", "-config", "ca.cnf", "-utf8", "-preserveDN", "-cert", "ca.crt", "-keyfile", "ca.key",
                "-in", f"{i}.csr", "-out", f"{i}.crt", "-days", "1", cwd=ca)
    rows = db.read_index(ca / "index.txt")
    assert len(rows) == len(HOSTILE_SUBJECTS)
    for row in rows:
        expected = openssl("x509", "-in", f"newcerts/{row.serial}.pem", "-noout", "-subject", "-nameopt", "RFC2253",
                           cwd=ca).stdout.rstrip("\n").removeprefix("subject=")
        assert db.rfc2253(row.subject) == expected, (row.subject, expected)


# ------------------------------------------------------------------ 8. a reload that fails on a host without systemd


def _fake_systemctl(tmp_path: Path) -> Path:
    fake = tmp_path / "systemctl"
    fake.write_text("#!/bin/sh\necho 'System has not been booted with systemd as init system (PID 1). Can'\\''t operate.' >&2\n"
                    "echo 'Failed to connect to bus: Host is down' >&2\nexit 1\n")
    fake.chmod(0o755)
    return fake


def test_revoke_whose_reload_fails_without_systemd_says_the_revocation_stands(fast_pki, mtls, tmp_path):
    assert mtls(["add-client", "lost", "--pki-dir", str(fast_pki)]).code == 0
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": f"{_fake_systemctl(tmp_path)} reload nginx"})
    res = mtls(["revoke", "lost", "--reason", "keyCompromise", "--pki-dir", str(fast_pki)])
    assert res.code == 1
    assert "Revoked lost" in res.out
    err = res.err
    assert "the revocation is done and kept" in err and "only the nginx reload failed" in err, err
    assert "has not been booted with systemd" in err
    assert "--no-reload" in err and "nginx.reload_command" in err
    assert "rolled back" not in err
    # and it is: openssl and the CRL say revoked
    serial = json.loads(mtls(["list", "--json", "--pki-dir", str(fast_pki)]).out)[0]["serial"]
    assert openssl("ca", "-config", "openssl.cnf", "-status", serial, cwd=fast_pki, check=False).stderr.count("Revoked") == 1
    crl = openssl("crl", "-in", "crl/ca.crl", "-noout", "-text", cwd=fast_pki).stdout
    assert f"Serial Number: {serial}" in crl
    # crl: the same, for a new CRL
    res = mtls(["crl", "--pki-dir", str(fast_pki)])
    assert res.code == 1 and "the new CRL is written and kept" in res.err and "--no-reload" in res.err
    assert "rolled back" not in res.err
    # --no-reload, as suggested: exit 0
    assert mtls(["crl", "--no-reload", "--pki-dir", str(fast_pki)]).code == 0


def test_another_reload_failure_also_keeps_the_revocation_and_points_at_nginx(fast_pki, mtls):
    assert mtls(["add-client", "lost", "--pki-dir", str(fast_pki)]).code == 0
    set_profile(fast_pki, nginx={"test_command": "true", "reload_command": "false"})
    res = mtls(["revoke", "lost", "--pki-dir", str(fast_pki)])
    assert res.code == 1 and "the revocation is done and kept" in res.err and "mtlsctl nginx reload" in res.err
    assert "rolled back" not in res.err


def test_the_exit_code_table_says_completed_steps_are_kept():
    text = (ROOT / "docs/cli.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "what could be rolled back was" in row and "is kept and said so" in row
