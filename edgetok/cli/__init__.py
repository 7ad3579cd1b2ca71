"""The `edgetok` command line: a thin dispatcher, one module per command.

Each command turns its flags into the library's configs (flag names are the configs' field
names) and calls the library; a user error (EdgetokError, a bad flag value, or an OSError such as
a full disk) becomes one line on stderr — `edgetok: error: …` — and a non-zero exit status (2 for
a flag click refused, 1 otherwise), never a traceback. SIGTERM and SIGHUP end a command as Ctrl-C
does, through its cleanup (temporaries removed, the KV disk tier closed); a second one kills.
"""

from __future__ import annotations

import errno
import signal

import click

from edgetok.cli import bench, chat, devices, export, inspect, plan, run, serve
from edgetok.errors import EdgetokError


class _Group(click.Group):
    def invoke(self, ctx):
        status = 1
        try:
            return super().invoke(ctx)
        except EdgetokError as e:
            message = str(e)
        except click.UsageError as e:  # one line too, with where to read more
            status = e.exit_code
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            message = f"{e.format_message().rstrip('.')}; see `{where} --help`"
        except OSError as e:  # full disk, unreadable file, ...
            if e.errno == errno.EPIPE:
                raise  # click's main ends quietly when the reader of stdout went away (`| head`)
            message = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        except Exception as e:
            interruption = _interruption(e)
            if interruption is None:
                raise  # a bug keeps its traceback
            raise interruption from None
        click.echo(f"edgetok: error: {message}", err=True)
        ctx.exit(status)


def _interruption(e: BaseException) -> BaseException | None:
    """The Ctrl-C or signal behind an exception, if any: one that lands while a C extension imports
    or runs a callback comes back wrapped (pybind11: `ImportError: initialization failed`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@click.group(cls=_Group)
@click.version_option(package_name="edgetok")
def cli() -> None:
    """Take a language model to the edge and run it there."""


for module in (run, chat, serve, export, inspect, bench, devices, plan):
    cli.add_command(module.command)


def _end_on_signal(signum, frame) -> None:
    """Unwind as for Ctrl-C, so `finally` blocks and close() run; the next such signal kills."""
    signal.signal(signum, signal.SIG_DFL)
    raise SystemExit(128 + signum)


def main() -> None:
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _end_on_signal)
    cli()  # standalone: click turns its own errors, Ctrl-C and broken pipes into exit codes
