"""The offline tokenizer: loads with AutoTokenizer, matches ModelConfig.tiny(), is cached and deterministic."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from maxent_jax.data import tokenizer as offline
from maxent_jax.model.config import ModelConfig


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return offline.build_offline_tokenizer(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


def test_vocabulary_and_special_ids_match_the_tiny_model(tok):
    cfg = ModelConfig.tiny()
    assert len(tok) == cfg.vocab_size == offline.VOCAB_SIZE
    assert tok.convert_tokens_to_ids(list(offline.SPECIAL_TOKENS)) == [0, 1, 2]
    assert tok.pad_token_id == cfg.pad_token_id and tok.eos_token_id == cfg.eos_token_id
    assert tok.convert_tokens_to_ids(list(offline.TAG_TOKENS)) == list(range(508, 512))


def test_chat_template_and_completion_tokens(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 + 7."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 12 + 7.<|im_end|>\n"
                      "<|im_start|>assistant\n")
    without = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("assistant\n")

    completion = "<think>12 + 7 = 19</think><answer>19</answer><|im_end|>"
    ids = tok(completion, add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    for tag in offline.TAG_TOKENS:
        assert tag in pieces  # each tag is one token
    digits = [p.strip("Ġ") for p in pieces if p.strip("Ġ").isdigit()]
    assert {"1", "2", "9"} <= set(digits) and all(len(d) == 1 for d in digits)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "<think>12 + 7 = 19</think><answer>19</answer>"


@pytest.mark.parametrize("text", ["héllo wörld 😀 123\n\ttabs", "Ünïcödé — ∑ x² ≤ 10", "   leading spaces"])
def test_any_text_round_trips_through_bytes(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_cached_after_first_use_and_deterministic(tok_dir, tmp_path, monkeypatch):
    started = time.perf_counter()
    again = offline.build_offline_tokenizer(tmp_path / "other")
    first_build_seconds = time.perf_counter() - started
    assert again.name == tok_dir.name
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert first_build_seconds < 10  # training alone takes ~0.15 s; this bound leaves room for a loaded CI box

    def no_training():
        raise AssertionError("the cached tokenizer was rebuilt")

    monkeypatch.setattr(offline, "_train", no_training)
    assert offline.build_offline_tokenizer(tmp_path / "other") == again
    assert [p.name for p in (tmp_path / "other").iterdir()] == [again.name]  # no temp dirs left behind


@pytest.mark.parametrize("clean_up", [False, True])
def test_policy_decode_equals_batch_decode(tok_dir, clean_up):
    """`Policy.decode` (the Rust backend directly, or batch_decode when spaces are cleaned up) gives
    batch_decode's texts: special tokens dropped, tags kept, rows of any length including empty ones."""
    import numpy as np

    from maxent_jax.run_setup import Policy

    tok = AutoTokenizer.from_pretrained(tok_dir, clean_up_tokenization_spaces=clean_up)
    rng = np.random.default_rng(0)
    rows = [tok("<think>1 + 2 = 3 , ok .</think><answer>3</answer><|im_end|>", add_special_tokens=False).input_ids,
            [], [0, 1, 2], *(rng.integers(0, offline.VOCAB_SIZE, n).tolist() for n in (1, 7, 40))]
    want = tok.batch_decode(rows, skip_special_tokens=True)
    assert want[0] == "<think>1 + 2 = 3 , ok .</think><answer>3</answer>"
    if not clean_up:  # the backend path must not fall back to batch_decode
        tok.batch_decode = None
    policy = Policy(*[None] * 4, tokenizer=tok, tokenizer_dir=str(tok_dir), generate=None)
    assert policy.decode(rows) == want
