"""The offline tokenizer of the embedded default: a small byte-level BPE trained in well under a second.

No hub is needed: `build_offline_tokenizer(cache_dir)` trains a 512-token byte-level BPE on a
built-in corpus (synthetic arithmetic in the `<think>/<answer>` format rendered through the chat
template, plus a little instruction English), and saves it as an ordinary Hugging Face tokenizer
directory that `transformers.AutoTokenizer.from_pretrained` loads.

Vocabulary (fixed, matches `ModelConfig.tiny()`): ids 0-2 are the Qwen-style specials
`<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos); then the 256 byte symbols and learned
merges; the last four ids are `<think>`, `</think>`, `<answer>`, `</answer>` as whole (non-special)
tokens, so decoding with `skip_special_tokens=True` keeps them. Digits are split one per token, as
Qwen does, which keeps arithmetic learnable for a tiny model.

The result is cached under a directory name that includes a hash of everything that defines it,
written to a temporary directory and renamed into place (atomic; concurrent builders are safe).
Training is deterministic: the same corpus and settings give byte-identical files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

VOCAB_SIZE = 512
PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN)
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
# One digit per token; letter runs and punctuation runs with an optional leading space; whitespace runs.
_PRE_TOKENIZE = r"\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Please reason step by step, and put your final answer inside the answer tags.",
    "You are a careful math tutor. Think first, then give the answer.",
)
_PHRASES = (
    "Compute", "What is", "Calculate the value of", "Find the result of", "Solve", "The answer is",
    "Let me think about this problem.", "First add the numbers, then check the result.",
    "Subtract the second number from the first.", "Multiply the two numbers together.",
    "The sum of", "the difference between", "the product of", "equals", "so the final answer is",
    "Question:", "Answer:", "Step", "because", "therefore", "which gives", "and", "then", "result",
)


def _corpus() -> list[str]:
    """Built-in training text: chat-rendered arithmetic with worked answers, plus instruction phrases."""
    lines: list[str] = []
    for a in range(0, 21):
        for b in range(0, 21, 3):
            for op, value in (("+", a + b), ("-", a - b), ("*", a * b)):
                system = _SYSTEM_PROMPTS[(a + b) % len(_SYSTEM_PROMPTS)]
                lines.append(
                    f"{BOS_CHAT_TOKEN}system\n{system}{EOS_TOKEN}\n"
                    f"{BOS_CHAT_TOKEN}user\nCompute {a} {op} {b}.{EOS_TOKEN}\n"
                    f"{BOS_CHAT_TOKEN}assistant\n<think>{a} {op} {b} = {value}</think>"
                    f"<answer>{value}</answer>{EOS_TOKEN}{PAD_TOKEN}"
                )
    for i, phrase in enumerate(_PHRASES):
        for j, other in enumerate(_PHRASES):
            if (i + j) % 3 == 0:
                lines.append(f"{phrase} {other.lower()} {i * j}.")
    return lines


def _fingerprint() -> str:
    """Hash of everything that defines the tokenizer, so a change never reuses a stale cache."""
    digest = hashlib.sha256()
    for part in (str(VOCAB_SIZE), _PRE_TOKENIZE, CHAT_TEMPLATE, *SPECIAL_TOKENS, *TAG_TOKENS, *_corpus()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def _train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TAG_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in TAG_TOKENS])
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"offline tokenizer has {tokenizer.get_vocab_size()} tokens; the corpus must "
                           f"support {VOCAB_SIZE} (ModelConfig.tiny().vocab_size)")
    return tokenizer


def _save(tokenizer: Tokenizer, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[BOS_CHAT_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(str(out_dir))


def build_offline_tokenizer(cache_dir: str | os.PathLike) -> Path:
    """Path of the offline tokenizer directory under `cache_dir`, training it on first use."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"offline-bpe-{VOCAB_SIZE}-{_fingerprint()}"
    if (target / "tokenizer.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".offline-bpe-", dir=cache_dir))
    try:
        _save(_train(), work)
        os.replace(work, target)
    except OSError:
        if not (target / "tokenizer.json").is_file():  # not a lost race with another builder
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
