"""Serving a model: an OpenAI-compatible HTTP API (FastAPI + uvicorn) and a chat page, one engine per process.

    config.py     ServeConfig (the `gptstack serve` flags) and the rule for binding beyond loopback
    schemas.py    request bodies -> GenRequest; results -> OpenAI response objects and stream chunks
    scheduler.py  the bounded queue and the worker thread that owns the engine (submit / iterate / cancel)
    hooks.py      logits hooks: logprobs with top alternatives, logit_bias, cancellation
    app.py        routes, auth, limits, errors, server-sent events; `serve(run_dir, config)`
    static/       the chat page (plain HTML/CSS/JS, no network)

Importing this package imports neither torch nor fastapi; app.py does.
"""
