"""The click that typer parses with, whichever typer is installed.

typer >= 0.26 carries its own copy of click (`typer._click`) and no longer uses the `click` package:
its usage errors are not `click.UsageError`, its contexts are not on click's stack, its groups and
options are not `click.Group`/`click.Option`. Older typer builds on `click`. Code that names a click class
or function can take it from here, so both ends of a typer range behave the same (the tests of the CLI's
habits do; the CLI itself moves to it when the typer/click caps go, issue 14).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typer import Abort as Abort  # typer's own in every version (click's Abort before 0.26)

if TYPE_CHECKING:  # the type checker runs against the newest typer (CI), i.e. its own click
    from typer._click.core import Command as Command
    from typer._click.core import Context as Context
    from typer._click.core import Parameter as Parameter
    from typer._click.exceptions import ClickException as ClickException
    from typer._click.exceptions import NoSuchOption as NoSuchOption
    from typer._click.exceptions import UsageError as UsageError
    from typer._click.globals import get_current_context as get_current_context
    from typer._click.shell_completion import CompletionItem as CompletionItem
    from typer._click.shell_completion import get_completion_class as get_completion_class
    from typer.core import TyperGroup as Group
    from typer.core import TyperOption as Option

    VENDORED = True
else:
    try:  # typer >= 0.26: its own click
        from typer._click.core import Command, Context, Parameter
        from typer._click.exceptions import ClickException, NoSuchOption, UsageError
        from typer._click.globals import get_current_context
        from typer._click.shell_completion import CompletionItem, get_completion_class
        from typer.core import TyperGroup as Group
        from typer.core import TyperOption as Option

        VENDORED = True
    except ImportError:  # typer < 0.26: the click package
        from click import ClickException, Command, Context, Group, NoSuchOption, Option, Parameter, UsageError, get_current_context
        from click.shell_completion import CompletionItem, get_completion_class

        VENDORED = False

__all__ = ["Abort", "ClickException", "Command", "CompletionItem", "Context", "Group", "NoSuchOption", "Option",
           "Parameter", "UsageError", "VENDORED", "get_completion_class", "get_current_context", "plain_coercion"]


# ------------------------------------------------------------------ typer >= 0.29: plain values without pydantic

_TYPER = object()  # "not a plain case: let typer's own coercion decide"


def _plain_value(annotation: object, parameter_info: object, value: object, param: object, ctx: object) -> object:
    """What typer's own coercion gives for the plain cases below, or _TYPER for anything else."""
    import re
    from pathlib import Path

    from typer._param_types import coerce_cli_path

    if (annotation is str and isinstance(value, str)) or (annotation is bool and isinstance(value, bool)):
        return value
    if annotation is int and isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value):
        return int(value)
    if annotation is Path and isinstance(value, (str, Path)) and value != "":
        return coerce_cli_path(Path(value), parameter_info, path_type=Path, param=param, ctx=ctx)  # type: ignore[arg-type]
    if getattr(annotation, "__origin__", None) is list and getattr(annotation, "__args__", None) == (str,) \
            and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return _TYPER


def plain_coercion(root: Command) -> int:
    """Give the plain parameters of a click command tree (str, int, Path, list[str], unconstrained) a coercion
    that needs no pydantic; returns how many. typer >= 0.29 coerces every value through a pydantic TypeAdapter
    built on first use — importing pydantic and building adapters costs more than most mtlsctl commands take to
    run (docs/performance.md). For these types typer's adapters accept a string and return it, int() of it, or
    a Path checked by typer's own coerce_cli_path; the plain coercion does exactly that, and hands every other
    value (an int spelled "+5", an empty path, ...) to typer's own coercion, so results and error messages are
    typer's (tests/test_click_compat.py compares both on every parameter). Older typer: nothing to do (0)."""
    try:
        from dataclasses import dataclass

        from typer._coercion import RuntimeParam, build_runtime_param
        from typer.core import _TyperParameter
    except ImportError:
        return 0

    @dataclass(frozen=True)
    class PlainRuntimeParam(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            done = _plain_value(self.annotation, self.parameter_info, value, param, ctx)
            if done is _TYPER:
                return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)
            return done

    count = 0

    help_names = (getattr(root, "context_settings", None) or {}).get("help_option_names", ["--help"])

    def walk(command: Any) -> None:
        nonlocal count
        # The help option is made on first use (and cached): make it now, with the names the app's contexts use,
        # so that it gets a plain coercion too.
        with _suppress():
            command.get_help_option(Context(command, help_option_names=help_names))
        for param in [*command.params, getattr(command, "_help_option", None)]:
            descriptor = getattr(param, "type_descriptor", None)
            if not isinstance(param, _TyperParameter) or descriptor is None or getattr(param, "_runtime_param", 1) is not None:
                continue
            info = descriptor.parameter_info
            if descriptor.file_annotation is not None or getattr(info, "parser", None) is not None \
                    or any(getattr(info, k, None) is not None for k in ("min", "max")) or getattr(info, "clamp", False):
                continue
            annotation = descriptor.annotation
            if annotation in (str, int, bool) or _is_path(annotation) or annotation == list[str]:
                param._runtime_param = PlainRuntimeParam(parameter_info=info, annotation=annotation)
                count += 1
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(root)
    return count


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(Exception)


def _is_path(annotation: object) -> bool:
    from pathlib import Path

    return annotation is Path
