"""Row -> prompt text, as the reference renders it (spec 2.2).

System prompt (if any) + user problem through the tokenizer's chat template with the
generation prompt appended; a tokenizer without a template gets `SYSTEM: ...\nUSER: ...\nASSISTANT:`.
Over-long prompts keep their first `limit` characters and are counted, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    text: str
    clipped: bool


def char_limit(max_prompt_chars: int, max_prompt_length: int, problem: str) -> int:
    """max(MAX_PROMPT_CHARS, 4 * max_prompt_length), raised so the bare problem always fits."""
    limit = max(max_prompt_chars, 4 * max_prompt_length)
    return max(limit, len("USER: ") + len(problem) + len("\nASSISTANT:"))


def render_prompt(
    tokenizer: Any,
    problem: str,
    *,
    system_prompt: str | None,
    chat_template: str | None,
    max_prompt_chars: int,
    max_prompt_length: int,
) -> RenderedPrompt:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": problem}
    ]
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=template
        )
    else:
        text = (f"SYSTEM: {system_prompt}\n" if system_prompt else "") + f"USER: {problem}\nASSISTANT:"
    limit = char_limit(max_prompt_chars, max_prompt_length, problem)
    if len(text) <= limit:
        return RenderedPrompt(text, False)
    clipped = text[:limit]
    if problem not in clipped:
        clipped += "\n" + problem
    return RenderedPrompt(clipped, True)
