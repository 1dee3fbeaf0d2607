"""`gptstack serve RUN`: the OpenAI-compatible HTTP server and the chat page (serve/)."""

from __future__ import annotations

import os
import sys


def register_serve_commands(sub) -> None:
    from dataclasses import fields

    from ..config import field_help
    from ..serve.config import ServeConfig

    doc = {f.name: field_help(f) for f in fields(ServeConfig)}
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /")
    p.add_argument("run", help="run directory of the model (an SFT, RL or DPO run for chat; any run for completions)")
    p.add_argument("--host", default="127.0.0.1", help=doc["host"] + " (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help=doc["port"] + " (default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY", help=doc["api_key"])
    p.add_argument("--no-auth", action="store_true", help=doc["no_auth"])
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help=doc["max_batch"] + " (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N", help=doc["max_queue"] + " (default: %(default)s)")
    p.add_argument("--model-name", default=None, metavar="NAME", help=doc["model_name"])
    p.add_argument("--device", default="auto", help=doc["device"] + " (default: %(default)s)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from ..serve.config import ServeConfig

    config = ServeConfig(host=args.host, port=args.port, api_key=args.api_key or os.environ.get("GPTSTACK_API_KEY"),
                         no_auth=args.no_auth, max_batch=args.max_batch, max_queue=args.max_queue,
                         model_name=args.model_name, device=args.device)
    config.validate()          # before loading the model: a refused --host should not wait for it
    from ..serve.app import serve

    serve(args.run, config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
