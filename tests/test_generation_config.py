"""Stop ids: generation_config.json's eos list is honoured, as transformers and vLLM honour it."""

from __future__ import annotations

import json

import jax
import pytest

from maxent_jax import run_setup
from maxent_jax.config import get_base_config
from maxent_jax.errors import UserError
from maxent_jax.model.generation_config import eos_token_ids, generation_eos_ids
from maxent_jax.rollout.backend import SamplingParams
from tests.rollout_fixtures import write_tiny_model


class _Tokenizer:
    """A Qwen2.5-Instruct-like tokenizer: its eos is <|im_end|> only."""

    eos_token_id = 151645

    def get_vocab(self):
        return {"<|im_end|>": 151645, "<|endoftext|>": 151643}

    def convert_tokens_to_ids(self, token):
        return self.get_vocab()[token]


def test_qwen_instruct_stops_at_both_ids_of_its_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "top_k": 20}))
    assert generation_eos_ids(tmp_path) == [151645, 151643]
    assert eos_token_ids(tmp_path, 151645, _Tokenizer()) == [151643, 151645]
    assert eos_token_ids(None, 151645, _Tokenizer()) == [151645]  # no directory: the tokenizer's only


def test_a_bad_generation_config_is_one_line(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": ["x"]}')
    with pytest.raises(UserError, match="generation_config.json: eos_token_id must be an integer or a list"):
        generation_eos_ids(tmp_path)


@pytest.mark.slow
def test_the_training_sampler_stops_at_a_generation_config_eos(tmp_path):
    """A tiny offline model dir: greedy decoding ends at the first token once generation_config lists it."""
    model_dir = write_tiny_model(tmp_path / "model", seed=0)
    config = get_base_config()
    config.model.name_or_path = str(model_dir)
    config.model.param_dtype = config.model.compute_dtype = "float32"
    prompt = [[1, 40, 41, 42]]
    params = SamplingParams(n=1, max_tokens=6, temperature=0.0)

    def first_generation():
        policy = run_setup.load_policy(config)
        ids, _, stopped = policy.generate(policy.params, prompt, params, jax.random.key(0))
        return ids[0], bool(stopped[0])

    ids, stopped = first_generation()
    assert len(ids) == 6 and not stopped, "pick a prompt whose greedy completion does not stop by itself"
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, ids[0]]}))
    ids2, stopped2 = first_generation()
    assert (ids2, stopped2) == (ids[:1], True)
