"""The built-in data sources: prose windows from pydoc_data.topics, and the 59 prompts."""

from __future__ import annotations

import pytest
import torch

from normgrowth.data import load_tokens
from normgrowth.errors import NormgrowthError


class CharTokenizer:
    """One id per character (code point mod 1000, + 10), so the expected windows follow from the raw text."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 + ord(c) % 1000 for c in text]}


def _running_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[name] + "\n\n" for name in sorted(topics))


def test_builtin_is_consecutive_windows_of_the_prose():
    text = _running_text()
    batch = load_tokens("builtin", tokenizer=CharTokenizer(), bos_token_id=0, n_seqs=5, seq_len=40)
    assert batch.tokens.shape == (5, 40) and bool(batch.attention_mask.all())
    for i in range(5):
        expected = [0] + [10 + ord(c) % 1000 for c in text[i * 39:(i + 1) * 39]]
        assert batch.tokens[i].tolist() == expected


def test_builtin_defaults_and_context_cap():
    batch = load_tokens("builtin", tokenizer=CharTokenizer(), bos_token_id=0)
    assert batch.tokens.shape == (64, 128)
    capped = load_tokens("builtin", tokenizer=CharTokenizer(), bos_token_id=0, n_seqs=2, n_ctx=16)
    assert capped.tokens.shape == (2, 16)
    with pytest.warns(UserWarning, match="longer than the model's context"):
        load_tokens("builtin", tokenizer=CharTokenizer(), bos_token_id=0, n_seqs=2, seq_len=32, n_ctx=16)


def test_builtin_asking_for_more_than_the_text_holds():
    n_chars = len(_running_text())
    with pytest.raises(NormgrowthError, match=f"at most {n_chars // 999} sequences"):
        load_tokens("builtin", tokenizer=CharTokenizer(), bos_token_id=0, n_seqs=n_chars // 999 + 1, seq_len=1000)


def test_prompts_are_the_59_prompts_one_sequence_each():
    from normgrowth.data import builtin_prompts

    prompts = builtin_prompts()
    batch = load_tokens("prompts", tokenizer=CharTokenizer(), bos_token_id=0)
    assert len(batch) == len(prompts) == 59
    assert batch.attention_mask.sum(1).tolist() == [1 + len(p) for p in prompts]
    assert torch.equal(batch.tokens[:, 0], torch.zeros(59, dtype=torch.long))


def test_builtin_sources_have_their_own_cache_identity():
    from normgrowth.cache import data_identity

    prose, prompts = data_identity("builtin"), data_identity("prompts")
    assert set(prose) == {"builtin"} and set(prompts) == {"prompts"}
    assert data_identity(None) == prose
