"""Every tool takes both spellings of a multi-word flag (`--num_samples` / `--num-samples`)."""

from __future__ import annotations

import pytest

from maxent_jax import evaluate, flag_spelling, serve
from maxent_jax.bench.__main__ import parse_args as bench_args
from maxent_jax.errors import UserError


def test_normalize_rewrites_only_defined_flags():
    argv = ["prog", "--num-samples=4", "--token_file", "t", "--config.train.max-steps=5", "--other-flag", "--", "--k-x"]
    assert flag_spelling.normalize(argv, ["num_samples", "token-file", "k_x"]) == [
        "prog", "--num_samples=4", "--token-file", "t", "--config.train.max-steps=5", "--other-flag", "--", "--k-x"]


def test_argparse_tools_take_underscores():
    args = serve.parse_args(["--model", "m", "--token_file", "secret", "--max_model_len=64", "--max-request-bytes", "9"])
    assert (args.token_file, args.max_model_len, args.max_request_bytes) == ("secret", 64, 9)
    assert bench_args(["e2e", "--max_steps", "3"]).max_steps == 3


def test_absl_tools_take_hyphens(monkeypatch):
    monkeypatch.setattr("sys.argv", ["evaluate"])
    with pytest.raises(UserError, match="--k=1,4 with --num_samples=2 is invalid"):
        evaluate.main(["evaluate", "--checkpoint=.", "--num-samples=2", "--k=1,4"])
