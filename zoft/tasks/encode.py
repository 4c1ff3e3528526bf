"""Tokenize examples: prompts with the tokenizer's special tokens (BOS), candidates without; cut on the left.

The model scores candidate c of an example as the continuation of `prompt_ids + cand_ids[c]`.
"""

from dataclasses import dataclass

from zoft.errors import ZoftError
from zoft.tasks.base import Example


@dataclass
class Encoded:
    """Token ids of one example."""

    prompt_ids: list[int]  # with the tokenizer's special tokens (e.g. BOS first)
    cand_ids: list[list[int]]  # one list per candidate, no special tokens
    answer: int
    kind: str


def _truncate(prompt_ids: list[int], keep: int, bos_id: int | None) -> list[int]:
    """The last `keep` tokens of the prompt, keeping a leading BOS in front of them."""
    if bos_id is not None and prompt_ids[0] == bos_id:
        return [bos_id] + prompt_ids[len(prompt_ids) - (keep - 1) :]
    return prompt_ids[len(prompt_ids) - keep :]


def check_unicode(ex: Example, where: str) -> None:
    """Text the tokenizer can take: a lone surrogate (JSON's "\\ud800" escape, or bytes that were never UTF-8)
    is not valid Unicode, and tokenizers reject it with an unreadable error."""
    for text in (ex.prompt, *ex.candidates):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ZoftError(f"{where}: {text[max(0, e.start - 20) : e.end + 20]!r} holds a lone surrogate "
                            f"{text[e.start : e.end]!r}, which is not valid Unicode; fix the data") from None


def encode(
    tokenizer, examples: list[Example], max_length: int | None, truncation: str = "left"
) -> tuple[list[Encoded], int]:
    """Tokenize `examples`; returns (encoded, number of prompts truncated).

    Limit: len(prompt_ids) + longest candidate <= max_length (None: no limit).
    truncation="left" drops prompt tokens after the BOS; "error" raises a ZoftError instead.
    """
    if truncation not in ("left", "error"):
        raise ZoftError(f"truncation must be 'left' or 'error', got {truncation!r}")
    if max_length is not None and max_length < 2:
        raise ZoftError(f"--max-length must be >= 2, got {max_length}")
    for i, ex in enumerate(examples):
        check_unicode(ex, f"example {i}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    prompts = tokenizer([ex.prompt for ex in examples])["input_ids"] if examples else []
    unique = sorted({c for ex in examples for c in ex.candidates})  # " terrible"/" great" once, not per row
    cand_table = dict(
        zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else [], strict=True)
    )

    out, n_truncated = [], 0
    for i, (ex, prompt_ids) in enumerate(zip(examples, prompts, strict=True)):
        prompt_ids = list(prompt_ids)
        cand_ids = [list(cand_table[c]) for c in ex.candidates]
        has_bos = bool(prompt_ids) and bos_id is not None and prompt_ids[0] == bos_id
        if len(prompt_ids) == int(has_bos):
            raise ZoftError(f"example {i}: prompt {ex.prompt!r:.60} tokenizes to no tokens; fix the data")
        for c, ids in zip(ex.candidates, cand_ids, strict=True):
            if not ids:
                raise ZoftError(f"example {i}: candidate {c!r} tokenizes to no tokens; fix the data")
        longest = max(len(ids) for ids in cand_ids)
        total = len(prompt_ids) + longest
        if max_length is not None and total > max_length:
            keep = max_length - longest
            if keep < 1 + int(has_bos):
                raise ZoftError(
                    f"example {i}: candidate of {longest} tokens leaves no room for the prompt within "
                    f"--max-length {max_length}; pass a larger --max-length"
                )
            if truncation == "error":
                raise ZoftError(
                    f"example {i}: prompt ({len(prompt_ids)} tokens) + longest candidate ({longest}) is "
                    f"{total - max_length} tokens over --max-length {max_length}; "
                    "pass --truncation left or a larger --max-length"
                )
            prompt_ids = _truncate(prompt_ids, keep, bos_id if has_bos else None)
            n_truncated += 1
        out.append(Encoded(prompt_ids, cand_ids, ex.answer, ex.kind))
    return out, n_truncated
