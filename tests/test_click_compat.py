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
