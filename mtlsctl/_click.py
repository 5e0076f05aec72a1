"""The click that typer parses with, whichever typer is installed.

typer >= 0.26 carries its own copy of click (`typer._click`) and no longer uses the `click` package:
its usage errors are not `click.UsageError`, its contexts are not on click's stack, its groups and
options are not `click.Group`/`click.Option`. Older typer builds on `click`. Code that names a click class
or function can take it from here, so both ends of a typer range behave the same (the tests of the CLI's
habits do; the CLI itself moves to it when the typer/click caps go, issue 14).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
           "Parameter", "UsageError", "VENDORED", "get_completion_class", "get_current_context"]
