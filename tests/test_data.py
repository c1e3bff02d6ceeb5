"""Data sources, prompt rendering and the resumable batch stream."""

import json

import pytest

from maxent_jax.config import get_base_config
from maxent_jax.data.prompts import render_prompt
from maxent_jax.data.sources import load_rows
from maxent_jax.data.stream import BatchStream
from maxent_jax.data.synthetic import arithmetic_splits
from maxent_jax.errors import UserError


def test_synthetic_splits_are_disjoint_and_correct():
    splits = arithmetic_splits(num_train=200, num_eval=20, max_operand=9, seed=0)
    train_problems = {r["problem"] for r in splits["train"]}
    assert not train_problems & {r["problem"] for r in splits["test"]}
    for row in splits["train"][:50]:
        a, op, b = row["problem"].removeprefix("Compute ").rstrip(".").split()
        assert row["answer"] == str(eval(f"{a}{op}{b}"))
        assert row["solution"].endswith(f"<answer>{row['answer']}</answer>")


def test_stream_is_deterministic_and_resumes_exactly():
    rows = list(range(50))
    full = BatchStream(rows, 8, seed=3)
    expected = [full.next() for _ in range(12)]
    first = BatchStream(rows, 8, seed=3)
    got = [first.next() for _ in range(5)]
    resumed = BatchStream(rows, 8, seed=3)
    resumed.restore(json.loads(json.dumps(first.state())))
    got += [resumed.next() for _ in range(7)]
    assert got == expected
    assert expected[0] != expected[6]  # a new epoch is a new permutation


def test_stream_hosts_take_disjoint_slices():
    rows = list(range(64))
    a = BatchStream(rows, 4, seed=1, process_index=0, process_count=2).next()
    b = BatchStream(rows, 4, seed=1, process_index=1, process_count=2).next()
    assert not set(a) & set(b) and len(a) == len(b) == 4


def test_stream_rejects_tiny_dataset():
    with pytest.raises(UserError, match="per_device_train_batch_size"):
        BatchStream([1, 2], 4, seed=0)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_local_file_dataset_and_column_fallbacks(tmp_path):
    config = get_base_config()
    config.data.dataset_name = _jsonl(tmp_path / "train.jsonl", [
        {"question": "1+1?", "solution": "2"}, {"question": "  ", "solution": "3"}, {"question": "2+2?", "solution": "4"},
    ])
    rows = load_rows(config.data, seed=0)
    assert rows["train"] == [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]


@pytest.mark.parametrize(
    "rows,override,needle",
    [
        ([{"problem": "x", "answer": "1"}], {"dataset_prompt_column": "text"}, "no column 'text'"),
        ([{"problem": " ", "answer": "1"}], {}, "no usable rows"),
    ],
)
def test_dataset_errors_are_one_line(tmp_path, rows, override, needle):
    config = get_base_config()
    config.data.dataset_name = _jsonl(tmp_path / "d.jsonl", rows)
    for key, value in override.items():
        config.data[key] = value
    with pytest.raises(UserError, match=needle) as err:
        load_rows(config.data, seed=0)
    assert "\n" not in str(err.value)


def test_saved_dataset_dict_bad_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"problem": "x", "answer": "1"}])}).save_to_disk(
        str(tmp_path / "saved"))
    config = get_base_config()
    config.data.dataset_name = str(tmp_path / "saved")
    assert load_rows(config.data, seed=0)["train"] == [{"problem": "x", "answer": "1"}]
    config.data.dataset_train_split = "validation"
    with pytest.raises(UserError, match="no split 'validation'; available: train"):
        load_rows(config.data, seed=0)


def test_mixture_weights_subsample(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"problem": f"a{i}", "answer": "1"} for i in range(10)])
    b = _jsonl(tmp_path / "b.jsonl", [{"problem": f"b{i}", "answer": "1"} for i in range(10)])
    config = get_base_config()
    config.data.dataset_mixture = json.dumps([{"id": a, "weight": 0.5}, {"id": b}])
    rows = load_rows(config.data, seed=0)["train"]
    assert sum(r["problem"].startswith("a") for r in rows) == 5 and len(rows) == 15


class _TemplateTokenizer:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt, chat_template):
        body = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


def test_prompt_rendering_and_clipping():
    tok = _TemplateTokenizer()
    p = render_prompt(tok, "What?", system_prompt="Be exact.", chat_template=None, max_prompt_chars=2048,
                      max_prompt_length=8)
    assert p.text == "<system>Be exact.<user>What?<assistant>" and not p.clipped
    long_system = "s" * 5000
    p = render_prompt(tok, "What?", system_prompt=long_system, chat_template=None, max_prompt_chars=100,
                      max_prompt_length=8)
    assert p.clipped and p.text.endswith("\nWhat?") and len(p.text) == 100 + len("\nWhat?")
    plain = render_prompt(object(), "Q", system_prompt=None, chat_template=None, max_prompt_chars=50,
                          max_prompt_length=4)
    assert plain.text == "USER: Q\nASSISTANT:"
