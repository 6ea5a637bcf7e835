"""The playground's server side: what the form offers (GET /ui/api/options) and the sweep grid
(POST /ui/api/sweep). A single image is `POST /generate` itself, called by the page, so the page shows the
API's PNG bit for bit.

A sweep renders one request per cell through the server's queue, exactly as POST /generate would render
it (same engine, same seed in every cell), and lays the cells out with `difflora generate --sweep`'s cells,
labels and grid (difflora.generation: sweep_cells, image_grid).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import random
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from difflora.config.generate import MAX_SWEEPS, GenerateConfig
from difflora.config.limits import MAX_WEIGHT
from difflora.config.schedulers import SCHEDULER_NAMES
from difflora.config.spec import AdapterWeight
from difflora.errors import ConfigError
from difflora.serving.request import GenerateBody

if TYPE_CHECKING:
    from difflora.serving.engine import Engine
    from difflora.serving.scheduler import Scheduler

MAX_SWEEP_CELLS = 25  # 5 x 5: one sweep is this many queued renders


class SweepBody(GenerateBody):
    """POST /generate's body plus `sweep`: one or two `NAME:W1,W2,...` entries, as `--sweep` takes them."""

    sweep: list[str]


def add_playground_routes(app: FastAPI, engine: Engine) -> None:
    @app.get("/ui/api/options")
    def options() -> dict[str, Any]:
        from difflora.generation.pipeline import default_size

        width, height = default_size(engine.pipe)
        limits = engine.limits
        return {
            "model": engine.identity.name,
            "samplers": list(SCHEDULER_NAMES),
            "defaults": {
                "steps": GenerateConfig.steps,
                "guidance": GenerateConfig.guidance,
                "scheduler": GenerateConfig.scheduler,
                "negative_prompt": GenerateConfig.negative_prompt,
                "width": width,
                "height": height,
            },
            "limits": {"size": limits.max_size, "steps": limits.max_steps, "weight": MAX_WEIGHT},
            "max_sweeps": MAX_SWEEPS,
            "max_sweep_cells": MAX_SWEEP_CELLS,
        }

    @app.post("/ui/api/sweep")
    async def sweep(body: SweepBody, request: Request) -> Response:
        cells, labels, cols = sweep_requests(body)
        scheduler: Scheduler = request.app.state.scheduler
        tickets = [await run_in_threadpool(engine.prepare, cell) for cell in cells]
        jobs = [scheduler.submit(ticket) for ticket in tickets]
        results = await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        images = [Image.open(io.BytesIO(result.images[0].png)) for result in results]
        grid = await run_in_threadpool(_grid_png, images, labels, cols)
        return Response(grid, media_type="image/png", headers={"X-Difflora-Seed": str(tickets[0].seed)})


def sweep_requests(body: SweepBody) -> tuple[list[GenerateConfig], list[str], int]:
    """One GenerateConfig per cell of the sweep (the body's adapters with the cell's weights, the sweep's
    adapters added where the body does not name them; one seed for every cell), the cells' labels, and the
    grid's column count."""
    from difflora.generation.generate import sweep_cells

    if body.num_images != 1:
        raise ConfigError("A sweep renders one image per cell: leave num_images at 1.")
    values = body.model_dump(exclude={"format", "adapters", "sweep"})
    values["seed"] = body.seed if body.seed is not None else random.randrange(2**31)
    adapters = (body.adapters,) if body.adapters.strip() else ()
    config = GenerateConfig(**values, adapters=adapters, sweep=tuple(body.sweep))  # validates the sweep
    if not config.sweeps:
        raise ConfigError('A sweep needs at least one "NAME:W1,W2,..." entry in "sweep".')
    cells = sweep_cells(config.sweeps)
    if len(cells) > MAX_SWEEP_CELLS:
        raise ConfigError(f"The sweep has {len(cells)} cells; at most {MAX_SWEEP_CELLS} (fewer weights).")
    base = list(config.adapter_weights)
    requests = []
    for weights, _ in cells:
        specs = [AdapterWeight(s.name, weights[s.name]) if s.name in weights else s for s in base]
        named = {s.name for s in base}
        specs += [AdapterWeight(name, w) for name, w in weights.items() if name not in named]
        spec_text = ",".join(str(s) for s in specs)
        requests.append(dataclasses.replace(config, sweep=(), adapters=(spec_text,) if specs else ()))
    return requests, [label for _, label in cells], len(config.sweeps[0][1])


def _grid_png(images: list[Image.Image], labels: list[str], cols: int) -> bytes:
    from difflora.generation.pipeline import image_grid

    grid = image_grid(images, rows=len(images) // cols, cols=cols, labels=labels)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()
