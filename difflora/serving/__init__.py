"""Serving: one base model loaded once, many adapters kept in memory, images over HTTP.

Takes in a ServeConfig (difflora.config.serve) and, per request, a prompt with an adapter spec in the CLI's
grammar ("style:0.7,subject:0.3"); hands on PNG files carrying the same A1111 `parameters` chunk that
`difflora generate` writes, bit for bit the image `generate` renders for the same settings.

`cache` keeps loaded adapters in a least-recently-used cache bounded in bytes; `engine` owns the pipeline,
checks a request (`prepare`), says which requests may share a batch (`batch_key`) and renders a batch
(`render_group`) under its lock with that batch's adapter set composed (no request ever sees another's
weights); `scheduler` is the bounded queue and the one thread that batches and renders from it; `metrics`
holds prometheus_client series in a registry per engine; `app` is the FastAPI application (routes, bearer
token, errors as JSON with one status per DiffloraError class); `server` runs it under uvicorn with a
shutdown that drains the queue. `difflora serve` (difflora.cli.serve) starts it.
"""
