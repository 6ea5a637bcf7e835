"""Serving: one base model loaded once, many adapters kept in memory, images over HTTP.

Takes in a ServeConfig (difflora.config.serve) and, per request, a prompt with an adapter spec in the CLI's
grammar ("style:0.7,subject:0.3"); hands on PNG files carrying the same A1111 `parameters` chunk that
`difflora generate` writes, bit for bit the image `generate` renders for the same settings.

`cache` keeps loaded adapters in a least-recently-used cache bounded in bytes; `engine` owns the pipeline,
serialises requests on it with a lock (no request ever sees another's weights) and composes each request's
set through the pipeline's Composer (difflora.composition); `metrics` counts what happened in the
Prometheus text format; `app` is the FastAPI application (routes, bearer token, errors as JSON with one
status per DiffloraError class). `difflora serve` (difflora.cli.serve) runs it under uvicorn.
"""
