"""Entry point of the rollout server: `python -m maxent_jax.serve --backend jax|vllm --model HF_DIR`.

The backend module is imported only after the flags are parsed, so `--backend vllm` never
imports jax and `--backend jax` never imports vllm; docs/rollout.md describes the protocol.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
from typing import Any, Sequence

from maxent_jax import flag_spelling
from maxent_jax.errors import UserError, exit_on_user_error
from maxent_jax.rollout.backend import RolloutBackend
from maxent_jax.rollout.connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_DEADLINE_S
from maxent_jax.rollout.limits import (
    DEFAULT_MAX_COMPLETIONS,
    DEFAULT_MAX_QUEUED,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_SEQUENCES_PER_REQUEST,
    RequestLimits,
)
from maxent_jax.rollout.server import DEFAULT_MAX_REQUEST_BYTES, RolloutServer

BACKENDS = ("jax", "vllm")


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--engine-arg {text!r}: expected KEY=VALUE (VALUE as JSON or a bare string)")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _positive(kind: type, noun: str) -> Any:
    """An argparse type: a finite `kind` > 0, else a message naming the value and what is valid."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {noun} > 0")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = flag_spelling.ArgumentParser(prog="python -m maxent_jax.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="jax", help="generation engine (default: jax)")
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 = pick a free one)")
    parser.add_argument("--token-file", help="file holding the bearer token that POST /weights must present; without it weight pushes are refused")
    parser.add_argument("--max-request-bytes", type=_positive(int, "an integer"), default=DEFAULT_MAX_REQUEST_BYTES, help="largest /generate body accepted")
    parser.add_argument("--max-completions-per-request", type=_positive(int, "an integer"), default=None,
                        help=f"prompts x n one /generate may ask for (default {DEFAULT_MAX_COMPLETIONS})")
    parser.add_argument("--max-request-tokens", type=_positive(int, "an integer"), default=None,
                        help="n x sum(prompt tokens + max_tokens) one /generate may ask for (default: "
                             f"max_model_len x {DEFAULT_SEQUENCES_PER_REQUEST} for the jax backend, x 1024 for vllm)")
    parser.add_argument("--max-queued-requests", type=_positive(int, "an integer"), default=DEFAULT_MAX_QUEUED,
                        help="requests waiting for the engine before more get 429 "
                             f"(default {DEFAULT_MAX_QUEUED}; weight pushes always wait)")
    parser.add_argument("--read-timeout", type=_positive(float, "a number of seconds"), default=DEFAULT_READ_TIMEOUT_S,
                        help=f"seconds a socket read may stall before the connection is closed (default {DEFAULT_READ_TIMEOUT_S:g})")
    parser.add_argument("--request-deadline", type=_positive(float, "a number of seconds"), default=DEFAULT_REQUEST_DEADLINE_S,
                        help="seconds a whole request (line, headers, body; not an authenticated weight push's body) may "
                             f"take to arrive from its first byte (default {DEFAULT_REQUEST_DEADLINE_S:g})")
    parser.add_argument("--max-connections", type=_positive(int, "an integer"), default=DEFAULT_MAX_CONNECTIONS,
                        help=f"connections served at once; more get a 503 (default {DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="jax backend: parameter and compute dtype")
    parser.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per sequence (default: the model's max positions)")
    parser.add_argument("--seed", type=int, default=0, help="jax backend: PRNG seed for requests without one")
    parser.add_argument("--engine-arg", type=_engine_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="vllm backend: extra engine keyword argument (repeatable)")
    parser.add_argument("--log-level", default=os.environ.get("MAXENT_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def read_token(path: str | None) -> str | None:
    """The bearer token from a file (stripped); None when no file is given."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as err:
        raise UserError(f"--token-file {path!r}: cannot read it ({err.strerror})") from None
    if not token:
        raise UserError(f"--token-file {path!r}: the file is empty; put a secret token in it")
    return token


def build_backend(args: argparse.Namespace) -> RolloutBackend:
    """Import and construct the chosen backend (lazily: each lives in its own environment)."""
    if not os.path.isdir(args.model):
        raise UserError(f"--model {args.model!r}: not a directory; expected a Hugging Face model directory")
    if args.backend == "jax":
        from maxent_jax.rollout.jax_backend import JaxBackend

        return JaxBackend.from_pretrained(args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed)
    from maxent_jax.rollout.vllm_backend import VLLMBackend

    kwargs = dict(args.engine_arg)
    if args.max_model_len is not None:
        kwargs.setdefault("max_model_len", args.max_model_len)
    return VLLMBackend(args.model, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = read_token(args.token_file)
    backend = build_backend(args)
    limits = RequestLimits.for_backend(
        backend, max_completions_per_request=args.max_completions_per_request,
        max_request_tokens=args.max_request_tokens, max_queued_requests=args.max_queued_requests)
    server = RolloutServer(backend, host=args.host, port=args.port, token=token, max_request_bytes=args.max_request_bytes,
                           limits=limits, read_timeout=args.read_timeout, request_deadline=args.request_deadline,
                           max_connections=args.max_connections)
    # Everything alive now lives as long as the process: keep it out of the cyclic collector's
    # scans, so the collection the jax backend runs after a native weight push takes milliseconds.
    gc.collect()
    gc.freeze()
    # One parseable line for launchers and tests that start the server on port 0.
    print(f"rollout server ready at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    exit_on_user_error(main)
