"""`edgetok serve`: an OpenAI-compatible HTTP server on a model (edgetok/serve/)."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import click

from edgetok.cli.console import utf8
from edgetok.cli.options import load_model, run_configs, run_options
from edgetok.errors import EdgetokError

SWITCH_INTERVAL_S = 0.0005


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def read_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    if api_key is not None and api_key_file is not None:
        raise EdgetokError("give either --api-key or --api-key-file, not both")
    if api_key_file is not None:
        api_key = utf8(api_key_file.read_bytes(), str(api_key_file)).strip()
        if not api_key:
            raise EdgetokError(f"{api_key_file} holds no key")
    return api_key


@click.command("serve")
@click.argument("model")
@click.option("--host", default="127.0.0.1", show_default=True, help="the address to listen on (loopback: this machine only)")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="read the key from this file (keeps it out of the process list)")
@click.option("--max-sequences", type=click.IntRange(min=1), default=4, show_default=True,
              help="requests that generate together (decoded in one batch); their caches are kept for prompt reuse")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests that may wait for a sequence; more are answered 503 with Retry-After")
@click.option("--alias", default=None, help="the model's id in the API (default: MODEL's name)")
@click.option("--metrics", is_flag=True, help="serve GET /metrics (Prometheus text)")
@run_options
def command(model, host, port, api_key, api_key_file, max_sequences, max_queue, alias, metrics, **kw):
    """Serve MODEL over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models.

    The run options (engine, KV cache, and the generation settings, which become the defaults a
    request's own fields override) are `edgetok run`'s."""
    import uvicorn

    from edgetok.serve.app import ServeConfig, Service, create_app

    key = read_key(api_key, api_key_file)
    configs = run_configs(kw)
    config = ServeConfig(alias or Path(model.rstrip("/")).name or model, key, max_sequences, max_queue, metrics)
    if not is_loopback(host) and key is None:
        click.echo(f"edgetok: warning: serving on {host} without an API key: anyone who can reach this port can use "
                   f"the model (give --api-key-file F)", err=True)
    failure: list[BaseException] = []

    def load() -> Service:
        service = Service(load_model(model, configs), config, configs.generation)
        click.echo(f"edgetok: serving {model} as '{config.alias}' on http://{host}:{server.config.port}/v1 "
                   f"({service.sequences.max_sequences} sequences at once"
                   f"{', batched' if service.scheduler.batched else ', in turn'})", err=True)
        return service

    def on_load_error(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    app = create_app(config, load, on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    # Every token passes between threads (a request's engine, the scheduler, the HTTP loop) that
    # take the GIL in turn: at Python's default switch interval (5 ms) a thread woken by a finished
    # step may wait that long behind one running Python. The server owns its process: its setting.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server.run()
    if failure:
        raise failure[0]
    if not server.started:
        raise EdgetokError(f"could not listen on {host}:{port} (in use, or not this machine's address)")
