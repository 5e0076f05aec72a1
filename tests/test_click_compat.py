"""Whatever click typer brings (issue 14, current dependencies): typer < 0.26 parses with the `click` package,
typer >= 0.26 with its own copy (`typer._click`). mtlsctl names click's classes only through mtlsctl._click,
so its error boundary, its habits (global options anywhere, choices in any case) and its dry-run JSON see
typer's real exceptions and contexts at both ends of the supported range (CI runs this file on the newest
releases and on tests/constraints-oldest.txt)."""

from __future__ import annotations

import importlib.util

import pytest
import typer

from mtlsctl import _click, cli


def test_the_shim_names_the_click_typer_parses_with():
    vendored = importlib.util.find_spec("typer._click") is not None
    assert _click.VENDORED is vendored
    root = cli.build_command()
    assert isinstance(root, _click.Group) and isinstance(root, _click.Command)
    options = [p for c in (root, *root.commands.values()) for p in c.params if isinstance(p, _click.Option)]
    assert len(options) > 20  # the walk that hoists global options and accepts choices in any case finds them
    ctx = _click.Context(root, info_name="mtlsctl")
    assert isinstance(ctx, _click.Context)


def test_typers_usage_errors_are_the_shims():
    root = cli.build_command()
    with pytest.raises(_click.UsageError):
        root.main(args=["add-client", "x", "--days", "many"], prog_name="mtlsctl", standalone_mode=False)
    with pytest.raises(_click.NoSuchOption):
        root.main(args=["list", "--no-such-option"], prog_name="mtlsctl", standalone_mode=False)


def test_get_current_context_sees_typers_context():
    app = typer.Typer()
    seen = []

    @app.command()
    def probe(flag: bool = typer.Option(False, "--flag")) -> None:
        ctx = _click.get_current_context(silent=True)
        seen.append(None if ctx is None else ctx.params)

    @app.command()
    def other() -> None:  # two commands: a group, as mtlsctl's
        pass

    typer.main.get_command(app).main(args=["probe", "--flag"], prog_name="probe", standalone_mode=False)
    assert seen == [{"flag": True}]


@pytest.mark.parametrize("args,first", [
    (["nosuch"], "error: No such command 'nosuch'."),
    (["add-client", "x", "--days", "many"], "error: Invalid value for '--days': "),  # typer 0.29 words the rest as pydantic
    (["list", "--status"], "error: Option '--status' requires an argument."),
    (["list", "--zzz-qqq"], "error: No such option"),
    (["revoke"], "error: "),
])
def test_usage_errors_are_exit_2_and_one_error_line(mtls, args, first):
    res = mtls(args)
    assert res.code == 2, res.err
    lines = res.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[0].startswith(first), res.err
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), res.err  # no usage block, no traceback
    assert "env var: 'None'" not in res.err  # click 8.2.0/8.2.1 (excluded in pyproject.toml) wrote this


def test_a_dry_run_with_json_reads_the_command_context(tmp_path, mtls):
    """io's dry-run printer finds --json through click's current context: with the wrong click it would
    print the text plan instead of JSON."""
    pki = tmp_path / "pki"
    res = mtls(["--pki-dir", str(pki), "init", "--dry-run", "--json"])
    assert res.code == 0, res.err
    assert res.out.lstrip().startswith("{") and '"dry_run": true' in res.out


# ------------------------------------------------------------------ start-up: one command built, plain coercion


def _help_of(root, path: list[str]) -> str:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises((SystemExit, _click.ClickException, typer.Exit)) as exc_info:
        root.main(args=[*path, "--help"], prog_name="mtlsctl", standalone_mode=False)
        raise SystemExit(0)  # standalone_mode=False: --help returns instead of exiting
    del exc_info
    return out.getvalue()


def _paths(command, prefix=()):
    for name, sub in getattr(command, "commands", {}).items():
        yield [*prefix, name]
        yield from _paths(sub, (*prefix, name))


def test_a_named_command_is_built_alone_and_parses_and_helps_as_in_the_whole_tree(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    full = cli.build_command()
    names = list(full.commands)
    assert len(names) > 20
    for path in _paths(full):
        part = cli.build_command(["--pki-dir", "/x", *path, "--json"])
        assert list(part.commands) == [path[0]], path  # only the invoked command (or group) was built
        assert _help_of(part, path) == _help_of(cli.build_command(), path), path
    # global options with values before the command are skipped as click skips them
    assert list(cli.build_command(["--profile", "list", "doctor"]).commands) == ["doctor"]
    assert list(cli.build_command(["--profile=p.yaml", "list"]).commands) == ["list"]
    # no command, --help, an unknown or mistyped name, completion: the whole tree
    for args in ([], ["--help"], ["lst"], ["--pki-dir", "/x"]):
        assert list(cli.build_command(args).commands) == names, args
    monkeypatch.setenv("_MTLSCTL_COMPLETE", "bash_complete")
    assert list(cli.build_command(["list"]).commands) == names


def test_unknown_command_still_gets_did_you_mean(mtls):
    r = mtls(["lst"])
    assert r.code == 2 and r.err.strip().splitlines() == ["error: No such command 'lst'. Did you mean 'list'?"]


def _typers_own(param, value, ctx):
    from typer._coercion import build_runtime_param

    return build_runtime_param(param.type_descriptor).coerce(value, param=param, ctx=ctx)


PLAIN_SAMPLES = {
    "str": ["alice", "", " x ", "-", "ünï", "a\nb"],
    "int": ["0", "7", "007", "-3", "+5", " 5", "5 ", "1_000", "", "x", "9" * 30, "1.0"],
    "Path": ["pki", "/etc/nginx/pki", "", ".", "-", "/nonexistent/x", "/etc/shadow", "/root"],
    "bool": [True, False],
    "list[str]": [(), ("a",), ("a", "b")],
}


@pytest.mark.skipif(importlib.util.find_spec("typer._coercion") is None, reason="typer < 0.29 coerces without pydantic")
def test_plain_coercion_gives_typers_own_results_and_errors_for_every_parameter():
    """Every parameter of every command, with typer's own coercion and with mtlsctl's plain one, on the same
    values: the same value, or the same error message."""
    root = cli.build_command()  # plain coercion installed
    seen, compared = set(), 0
    for path in [[], *_paths(root)]:
        command = root
        for name in path:
            command = command.commands[name]
        ctx = _click.Context(command, info_name="mtlsctl")
        for param in [*command.params, command.get_help_option(ctx)]:
            runtime = getattr(param, "_runtime_param", None)
            if param is None or runtime is None or type(runtime).__name__ != "PlainRuntimeParam":
                continue
            ann = param.type_descriptor.annotation
            kind = "list[str]" if ann == list[str] else ann.__name__
            seen.add(kind)
            for value in PLAIN_SAMPLES[kind]:
                outcomes = []
                for plain in (True, False):
                    try:
                        got = runtime.coerce(value, param=param, ctx=ctx) if plain else _typers_own(param, value, ctx)
                        outcomes.append(("ok", got))
                    except _click.ClickException as exc:
                        outcomes.append(("error", exc.format_message()))
                assert outcomes[0] == outcomes[1], (path, param.name, value, outcomes)
                compared += 1
    assert seen == set(PLAIN_SAMPLES) and compared > 200


@pytest.mark.skipif(importlib.util.find_spec("typer._coercion") is None, reason="typer < 0.29 coerces without pydantic")
def test_a_plain_run_builds_no_pydantic_adapter(tmp_path):
    """`mtlsctl --pki-dir D --profile P list --status valid --json` parses every value without typer's pydantic
    adapters (the start-up cost plain_coercion removes)."""
    import subprocess
    import sys

    argv = ["--pki-dir", str(tmp_path / "pki"), "--ca-passphrase-fd", "3",
            "list", "--status", "valid", "--expiring-within", "30", "--json"]
    # the run itself fails (no PKI there) after parsing every value; -X importtime lists every module imported
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "mtlsctl", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and "error: no CA in" in out.stderr, out.stderr[-500:]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "mtlsctl.cli.certificates" in imported and "typer._coercion" in imported
    assert "typer._adapters" not in imported
