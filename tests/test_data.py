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
    # 'solution' serves as the answer and, being the worked-solution column too, is kept for the warm-up.
    assert rows["train"] == [{"problem": "1+1?", "answer": "2", "solution": "2"},
                             {"problem": "2+2?", "answer": "4", "solution": "4"}]


def test_the_configured_worked_solution_column_is_kept(tmp_path):
    config = get_base_config()
    config.data.dataset_name = _jsonl(tmp_path / "train.jsonl", [
        {"problem": "1+1?", "answer": "2", "steps": "<think>1+1=2</think><answer>2</answer>"},
        {"problem": "2+2?", "answer": "4", "steps": ""}])
    config.data.dataset_worked_solution_column = "steps"
    rows = load_rows(config.data, seed=0)["train"]
    assert rows == [{"problem": "1+1?", "answer": "2", "solution": "<think>1+1=2</think><answer>2</answer>"},
                    {"problem": "2+2?", "answer": "4"}]  # an empty solution is not one


BAD_FILES = {
    # name: (file contents, what the one line must say)
    "empty.jsonl": (b"", r"is empty: it has no rows"),
    "blank.jsonl": (b"\n  \n", r"is empty: it has no rows"),
    "latin1.jsonl": ('{"problem": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"),
                     r"is not UTF-8 text: byte 0xe9 at byte offset 16 \(line 1\)"),
    "torn.jsonl": (b'{"problem": "a", "answer": "1"}\n{"problem": "b", "ans', r"line 2 \(byte offset 32\) is not valid JSON"),
    "list_line.jsonl": (b'{"problem": "a", "answer": "1"}\n[1, 2]\n', r"line 2 \(byte offset 32\) is a JSON list"),
    "binary.csv": (b"problem,answer\n\x00\x01\x02,3\n", r"NUL byte at byte offset 15 \(line 2\)"),
    "random.csv": (bytes(range(128, 256)) * 4, r"not UTF-8 text: byte 0x80 at byte offset 0 \(line 1\)"),
    "ragged.csv": (b"problem,answer\n1+1,2\n2+2,4,extra\n", r"row ending on line 3 has 3 fields but the header has 2"),
    "latin1.json": ('[{"problem": "caf\u00e9", "answer": "1"}]'.encode("latin-1"),
                    r"not UTF-8 text: byte 0xe9 at byte offset 17 \(line 1\)"),
    "torn.json": (b'[{"problem": "a", "answer": "1"}, {"problem": ', r"not valid JSON at line 1, column 47"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_data_file_is_one_line_naming_the_file_and_where(tmp_path, name):
    """Before issue 21: StopIteration, UnicodeDecodeError or DatasetGenerationError tracebacks."""
    contents, needle = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(contents)
    config = get_base_config()
    config.data.dataset_name = str(path)
    with pytest.raises(UserError, match=needle) as err:
        load_rows(config.data, seed=0)
    assert str(err.value).startswith(f"data file {path}") and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ['[\n {"problem": "1+1", "answer": "2"}\n]\n',
                                  '{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2", "answer": "4"}\n'])
def test_good_json_files_pass_the_check(tmp_path, text):
    """A pretty-printed JSON list and JSON lines in a .json file are both datasets' json format."""
    path = tmp_path / "ok.json"
    path.write_text(text)
    config = get_base_config()
    config.data.dataset_name = str(path)
    assert load_rows(config.data, seed=0)["train"][0] == {"problem": "1+1", "answer": "2"}


@pytest.mark.slow  # ~25 s: the entry point builds the policy before it reads the data
def test_a_bad_data_file_exits_2_with_one_line(tmp_path):
    """The entry point's view: exit status 2 and one line on stderr, before any training step."""
    import subprocess
    import sys

    from tests.fault_fixtures import REPO

    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "maxent_jax.train", f"--workdir={tmp_path / 'run'}",
                           f"--config.data.dataset_name={path}", "--config.logging.progress=False"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == f"error: data file {path} is empty: it has no rows"
    assert "Traceback" not in done.stderr


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


@pytest.mark.slow
def test_a_users_dataset_with_worked_solutions_can_warm_up(tmp_path, capsys):
    """A local file with problem / answer / worked-solution columns runs the supervised warm-up
    (before issue 21 only the synthetic task could: the loader dropped the solution column)."""
    from tests.fault_fixtures import run, tiny_config

    rows = [{"problem": f"Compute {a} + {b}.", "answer": str(a + b),
             "worked": f"<think>{a} + {b} = {a + b}</think><answer>{a + b}</answer>"}
            for a in range(8) for b in range(8)]
    config = tiny_config(**{"data.dataset_name": _jsonl(tmp_path / "mine.jsonl", rows),
                            "data.dataset_worked_solution_column": "worked",
                            "train.sft_warmup_steps": 2, "train.max_steps": 1})
    trainer = run(config, tmp_path / "run")
    assert trainer.sft_done and trainer.step == 1
    assert "supervised warm-up: 2 steps" in capsys.readouterr().out
