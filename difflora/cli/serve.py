"""`difflora serve`: generation over HTTP, the base model loaded once and adapters cached in memory. A thin
layer over difflora.serving, with one flag per ServeConfig field (difflora.cli.options); uvicorn serves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from difflora.cli.options import config_file_option, config_from_flags, config_options
from difflora.config.serve import TOKEN_ENV, ServeConfig


@click.command("serve")
@config_options(ServeConfig)
@config_file_option("serve")
def serve_command(config_file: Path | None, **flags: Any) -> None:
    """Serve POST /generate over HTTP: one base model, many adapters, switched per request.

    Example: difflora serve --adapter-dir adapters, then
    curl -s localhost:8000/generate -H 'Content-Type: application/json'
    -d '{"prompt": "a cat", "adapters": "style:0.7"}' -o cat.png
    (GET /adapters, /health and /metrics tell what it holds and did).
    """
    if flags.get("token") is None:  # the environment keeps the secret out of the process list
        flags["token"] = os.environ.get(TOKEN_ENV) or None
    config = config_from_flags(ServeConfig, flags, config_file=config_file, section="serve")

    from difflora.serving.app import create_app
    from difflora.serving.engine import Engine
    from difflora.serving.scheduler import QueueOptions
    from difflora.serving.server import run_server

    engine = Engine.from_config(config)
    queue = QueueOptions.from_config(config)
    data_root = Path(config.data_root) if config.data_root else None
    app = create_app(
        engine, token=config.token, max_body_bytes=config.max_body_kb * 1024, queue=queue, data_root=data_root
    )
    host = f"[{config.host}]" if ":" in config.host else config.host
    access = "bearer token required" if config.token else "no token: loopback only"
    click.echo(
        f"Serving {engine.identity.name} ({engine.mode} composition, {len(engine.available())} adapters "
        f"available) on http://{host}:{config.port} ({access}); the web UI is at http://{host}:{config.port}/. "
        "Ctrl+C or SIGTERM drains the queue and stops.",
        err=True,
    )
    run_server(app, app.state.scheduler, host=config.host, port=config.port,
               shutdown_timeout=config.shutdown_timeout)  # fmt: skip
