"""The Typer app, its global options, and `main`: the one error boundary and the exit-code policy.

Exit codes (errors.py; docs/cli.md): 0 ok; 1 an operation failed (MtlsError; rolled back where it can be, a
completed step kept and said so); 2 bad input (InputError, a click usage error: one line and a hint); 3 an
internal error (a bug: one line, --debug or MTLSCTL_DEBUG shows the traceback); 130 interrupted (Ctrl-C,
SIGTERM). An OSError the core did not turn into an MtlsError is said with its path (2 for a wrong path, else 1).

Before click parses, `main` applies the habits people bring to a command line: global options after the
command too (`hoist_global_options`), choice values in any case (`CHOICES`), "did you mean" for a mistyped
command or option (`usage_error_lines`), and shell completion (_MTLSCTL_COMPLETE).
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mtlsctl import __version__
from mtlsctl import _click as click
from mtlsctl.cli.context import CliState, run_state
from mtlsctl.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    MtlsError,
    os_error_exit_code,
    os_error_lines,
)

app = typer.Typer(
    name="mtlsctl",
    help=(
        "Run the private Certificate Authority behind nginx mutual TLS.\n\n"
        "mtlsctl lays out the PKI exactly as the guide does (/etc/nginx/pki: ca/ certs/ crl/ private/ "
        "newcerts/, index.txt, serial, crlnumber, openssl.cnf) and drives the openssl binary for every "
        "cryptographic step. Add --dry-run to see the exact openssl commands.\n\n"
        "The options below may also follow the command (mtlsctl add-client NAME --pki-dir DIR). Choice values "
        "(--key-type EC, --status Revoked) are read in any case. Shell completion: mtlsctl completion bash|zsh|fish.\n\n"
        "Exit codes: 0 ok, 1 operation failed (rolled back where it can be; a completed step, such as a "
        "revocation, is kept and said so), 2 bad input (nothing written), 3 internal error, 130 interrupted."
    ),
    no_args_is_help=True,
    # typer's --install-completion guesses the shell and appends to ~/.bashrc; `mtlsctl completion SHELL`
    # (maintenance.py) prints or installs the same machinery's script for a named shell and never overwrites a file.
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,  # locals can hold passwords
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

# The help panels of `mtlsctl --help`, one per command module, in this order (the first command of each
# panel, in registration order, places it).
PANEL_CA = "CA"
PANEL_CERTIFICATES = "Certificates"
PANEL_REVOCATION = "Revocation"
PANEL_NGINX = "nginx"
PANEL_MAINTENANCE = "Maintenance"

# Help texts several commands share.
DRY_RUN_HELP = "Print the openssl commands and change nothing."
JSON_HELP = "Print the result as JSON."
NO_RELOAD_HELP = "Do not run the profile's nginx test and reload commands."
P12_HELP = "PKCS#12 profile: compat (works everywhere, default), modern (OpenSSL 3 default), legacy (RC2, old importers only)."


def _version(value: bool) -> None:
    if value:
        print(f"mtlsctl {__version__}")
        raise typer.Exit()


@app.callback()
def global_options_callback(
    ctx: typer.Context,
    pki_dir: Annotated[Path | None, typer.Option(
        "--pki-dir", envvar="PKI_DIR", metavar="DIR",
        help="The PKI directory. Order: --pki-dir, $PKI_DIR, the profile's pki_dir, /etc/nginx/pki.")] = None,
    profile: Annotated[Path | None, typer.Option(
        "--profile", envvar="MTLSCTL_PROFILE", metavar="FILE",
        help="YAML site profile. Order: --profile, $MTLSCTL_PROFILE, <pki-dir>/mtls.yaml, built-in defaults (the guide's).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show a traceback for internal errors.")] = False,
    ca_passphrase_file: Annotated[Path | None, typer.Option(
        "--ca-passphrase-file", metavar="FILE",
        help="Passphrase of an encrypted CA key (ca.key.encrypt), first line of FILE.")] = None,
    ca_passphrase_fd: Annotated[int | None, typer.Option(
        "--ca-passphrase-fd", metavar="N", help="Passphrase of an encrypted CA key, read from descriptor N (e.g. 3<file).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """The global options, into this run's CliState (ctx.obj)."""
    opts = run_state(ctx)
    opts.pki_dir, opts.profile, opts.debug = pki_dir, profile, debug
    opts.ca_passphrase_file, opts.ca_passphrase_fd = ca_passphrase_file, ca_passphrase_fd


# ------------------------------------------------------------------ help: prose re-flowed, examples kept


def _reflow(doc: str | None) -> str | None:
    """Join the lines of each prose paragraph of a docstring, so rich wraps it to the terminal; a
    paragraph that starts with \\b (examples, commands to paste) keeps its lines as written."""
    if not doc:
        return doc

    def is_block(paragraph: str) -> bool:  # \b with indented lines (examples, commands); \b prose is re-flowed
        lines = paragraph.split("\n")
        return lines[0].strip() == "\b" and any(line.startswith(" ") for line in lines[1:])

    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(p if is_block(p) else " ".join(line.strip() for line in p.replace("\b", "").splitlines()).strip()
                       for p in paragraphs)


def reflow_help(typer_app: typer.Typer) -> None:
    """Re-flow every command's docstring (once, when the package has registered them all)."""
    for command in typer_app.registered_commands:
        if command.callback is not None and command.help is None:
            command.callback.__doc__ = _reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


# ------------------------------------------------------------------ habits: global options anywhere, choices in any
# case, "did you mean", completion. All of it acts on the click command main() builds, before click parses.

# Choice options, by name, wherever a command has one: accepted in any case, handed on in one canonical spelling
# (the core's own check still names a value that is not one of them). tests/test_cli_habits.py finds every
# option with a choice metavar (a|b) and checks it is here, and checks these against the core's lists.
CHOICES: dict[str, tuple[str, ...]] = {
    "--key-type": ("rsa", "ec"),
    "--p12": ("compat", "modern", "legacy"),
    "--format": ("p12", "mobileconfig"),
    "--status": ("valid", "expiring", "expired", "revoked"),
    "--verify-client": ("on", "optional"),
    "--reason": ("unspecified", "keyCompromise", "CACompromise", "affiliationChanged", "superseded",
                 "cessationOfOperation", "certificateHold"),
}


def _option_arity(command: click.Command, *, eager: bool = True) -> dict[str, int]:
    """Each option name of a command -> how many values follow it (0 for a flag)."""
    out: dict[str, int] = {}
    for param in command.params:
        if isinstance(param, click.Option) and (eager or not param.is_eager):
            for name in (*param.opts, *param.secondary_opts):
                out[name] = 0 if (param.is_flag or param.count) else param.nargs
    return out


def global_options(root: click.Command) -> dict[str, int]:
    """The global options (the callback's, --version and --help left out) and how many values each takes."""
    return _option_arity(root, eager=False)


def hoist_global_options(root: click.Group, args: list[str]) -> list[str]:
    """Move the global options given after the command path (and their values) to just before it.

    Walks the arguments as click will parse them: the root's own options and values, the command path,
    then each arg after it — an option of the command itself keeps its place and its value (so a value
    that happens to be spelled --pki-dir stays a value, and restore's own --pki-dir stays restore's),
    `--opt=value` counts as one arg, and `--` ends the walk. Unknown commands and options are left
    alone for click to refuse.
    """
    root_arity, globals_ = _option_arity(root), global_options(root)
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            return args
        i += 1 + (0 if "=" in args[i] else root_arity.get(args[i], 0))
    if i >= len(args) or not isinstance(root, click.Group) or args[i] not in root.commands:
        return args
    start, command = i, root.commands[args[i]]
    own, hoisted, rest = _option_arity(command), [], [args[i]]
    i += 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0] if arg.startswith("--") else arg
            if name in own:
                n = 0 if "=" in arg else own[name]
                rest.extend(args[i:i + 1 + n])
            elif name in globals_:
                n = 0 if "=" in arg else globals_[name]
                if i + n >= len(args):
                    raise click.UsageError(f"Option '{name}' requires an argument.")
                hoisted.extend(args[i:i + 1 + n])
            else:
                n = 0
                rest.append(arg)
            i += 1 + n
            continue
        rest.append(arg)
        if isinstance(command, click.Group):  # a sub-command name: its options from here on
            sub = command.commands.get(arg)
            if sub is None:
                rest.extend(args[i + 1:])
                break
            command, own = sub, _option_arity(sub)
        i += 1
    return args[:start] + hoisted + rest


def _canonical_choice(choices: tuple[str, ...], then: Any) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if isinstance(value, str):
            value = next((c for c in choices if c.lower() == value.lower()), value)
        return then(ctx, param, value) if then is not None else value
    return callback


def _complete_choice(choices: tuple[str, ...]) -> Any:
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from mtlsctl._click import CompletionItem

        return [CompletionItem(c) for c in choices if c.lower().startswith(incomplete.lower())]
    return complete


def accept_any_case(command: click.Command) -> None:
    """Every CHOICES option of every command: any case in, the canonical spelling out; its values complete."""
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_flag:
            choices = next((CHOICES[o] for o in param.opts if o in CHOICES), None)
            if choices is not None:
                param.callback = _canonical_choice(choices, param.callback)
                param._custom_shell_complete = _complete_choice(choices)
    for sub in getattr(command, "commands", {}).values():
        accept_any_case(sub)


def _command_names(typer_app: typer.Typer) -> dict[str, Any]:
    """The top-level command and group names of an app -> their registration (CommandInfo / TyperInfo)."""
    from typer.main import get_command_name

    out: dict[str, Any] = {}
    for command in typer_app.registered_commands:
        if command.callback is not None:
            out[command.name or get_command_name(command.callback.__name__)] = command
    for group in typer_app.registered_groups:
        name = group.name or (group.typer_instance.info.name if group.typer_instance is not None else None)
        if isinstance(name, str):
            out[name] = group
    return out


def invoked_command(args: list[str]) -> str | None:
    """The top-level command the arguments name, found as click will: past the global options and their values
    (the root's own options, from the callback alone), the first argument; None when there is none."""
    import typer.main

    skeleton = copy_app(commands=[], groups=[])
    arity = _option_arity(typer.main.get_command(skeleton))
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            i += 1
            break
        i += 1 + (0 if "=" in args[i] else arity.get(args[i], 0))
    return args[i] if i < len(args) else None


def copy_app(*, commands: list[Any], groups: list[Any]) -> typer.Typer:
    """`app` with only these registered commands and groups: its callback, help and settings unchanged."""
    import copy

    part = copy.copy(app)
    part.registered_commands, part.registered_groups = commands, groups
    return part


def build_command(args: list[str] | None = None) -> click.Group:
    """The click command main() runs: typer's, with the habits above applied (a new one each call).

    With `args` that name a known command (`mtlsctl list ...`), only that command (or group) is built: typer
    turns every command's signature into click parameters, and building all of them costs more than most
    commands take to run (docs/performance.md). Everything else — no command, `--help`, an unknown or
    mistyped name, shell completion — gets the whole tree, so help, "did you mean" and completion see every
    command. A command's own parsing and help are the same either way (tests/test_cli_habits.py).
    """
    import typer.main

    target = app
    if args is not None and not os.environ.get("_MTLSCTL_COMPLETE"):
        name = invoked_command(args)
        known = _command_names(app)
        if name is not None and name in known:
            info = known[name]
            target = copy_app(commands=[c for c in app.registered_commands if c is info],
                              groups=[g for g in app.registered_groups if g is info])
    root = typer.main.get_command(target)
    assert isinstance(root, click.Group)
    accept_any_case(root)
    click.plain_coercion(root)
    return root


def _suggest(word: str, candidates: list[str]) -> list[str]:
    """Close spellings (difflib), and names the word begins (add -> add-client, add-server); at most three."""
    import difflib

    starts = [c for c in candidates if len(word.lstrip("-")) >= 2 and c.startswith(word) and c != word]
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return list(dict.fromkeys(starts + close))[:3]


def _one_of(names: list[str], quote: str = "") -> str:
    shown = [f"{quote}{n}{quote}" for n in names]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def usage_error_lines(exc: click.UsageError, root: click.Command | None = None) -> list[str]:
    """click's usage error as mtlsctl prints it: `error: ...` and a hint; a mistyped command or option gets
    one line instead, with what it probably meant."""
    import re

    ctx = exc.ctx
    where = ctx.command_path if ctx is not None else "mtlsctl"
    if isinstance(exc, click.NoSuchOption) and ctx is not None:
        candidates = [o for o in _option_arity(ctx.command) if o.startswith("--")]
        if ctx.parent is not None and root is not None:  # global options are accepted after the command too
            candidates += [o for o in global_options(root) if o not in candidates]
        found = _suggest(exc.option_name, candidates)
        if found:
            return [f"error: {exc.message.rstrip('.')}. Did you mean {_one_of(found)}?"]
    # typer >= 0.20 appends its own suggestion after the sentence; ours replaces it (one line, every match)
    match = re.match(r"No such command (['\"])(.*?)\1\.", exc.message, re.S)
    if match and ctx is not None and isinstance(ctx.command, click.Group):
        found = _suggest(match.group(2), ctx.command.list_commands(ctx))
        if found:
            return [f"error: {match.group(0).rstrip('.')}. Did you mean {_one_of(found, quote=chr(39))}?"]
    # click's multi-line usage block becomes our one-line error + hint
    return [f"error: {exc.format_message()}", f"hint: run `{where} --help`"]


# ------------------------------------------------------------------ the one error boundary


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _say(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None, *, state: CliState | None = None) -> NoReturn:
    """Console entry point (`mtlsctl`, `python -m mtlsctl`): run one command, then exit with its code.

    Args:
        argv: the arguments (default: sys.argv[1:]).
        state: where this run's global options go; a fresh one by default. A caller that passes its own
            (a test) can look at what the callback parsed afterwards.
    """
    from mtlsctl.files import set_private_umask

    opts = state if state is not None else CliState()
    set_private_umask()
    signal.signal(signal.SIGTERM, _on_sigterm)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger = logging.getLogger("mtlsctl")
    logger.handlers[:] = [handler]
    logger.propagate = False
    code = EXIT_OK
    root: click.Group | None = None
    try:
        args = list(sys.argv[1:] if argv is None else argv)
        root = build_command(args)
        if os.environ.get("_MTLSCTL_COMPLETE"):  # a shell asks what to complete: typer's classes answer
            from typer._completion_classes import completion_init

            completion_init()
        args = hoist_global_options(root, args)
        rv = root.main(args=args, prog_name="mtlsctl", standalone_mode=False, obj=opts)
        code = rv if isinstance(rv, int) else EXIT_OK
        if code == EXIT_INTERRUPTED:  # typer turns KeyboardInterrupt (and our SIGTERM) into Exit(130)
            print("interrupted; what this run wrote was rolled back", file=sys.stderr)
    except MtlsError as exc:
        _say(exc.lines())
        code = exc.exit_code
    except click.Abort:
        print("interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except click.UsageError as exc:
        _say(usage_error_lines(exc, root))
        code = EXIT_BAD_INPUT
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        code = EXIT_BAD_INPUT if exc.exit_code == 2 else exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; what this run wrote was rolled back", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except OSError as exc:
        _say(os_error_lines(exc))
        code = os_error_exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - the boundary: a bug must not print a traceback holding secrets
        if opts.debug or os.environ.get("MTLSCTL_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("hint: this is a bug in mtlsctl; run again with --debug and report the traceback", file=sys.stderr)
        code = EXIT_INTERNAL
    sys.stdout.flush()
    sys.exit(code)
