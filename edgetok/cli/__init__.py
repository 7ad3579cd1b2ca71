"""The `edgetok` command line: a thin dispatcher, one module per command.

Each command turns its flags into the library's configs (flag names are the configs' field
names) and calls the library; a user error (EdgetokError, or an OSError such as a full disk)
becomes one sentence on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import errno

import click

from edgetok.cli import bench, chat, devices, export, inspect, plan, run
from edgetok.errors import EdgetokError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgetokError as e:
            message = str(e)
        except OSError as e:  # full disk, unreadable file, ...
            if e.errno == errno.EPIPE:
                raise
            message = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        click.echo(f"edgetok: error: {message}", err=True)
        ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="edgetok")
def cli() -> None:
    """Take a language model to the edge and run it there."""


for module in (run, chat, export, inspect, bench, devices, plan):
    cli.add_command(module.command)


def main() -> None:
    cli()  # standalone: click turns its own errors, Ctrl-C and broken pipes into exit codes
