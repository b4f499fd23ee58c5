"""Incremental detokenization never emits a broken character and concatenates to the whole text."""

from kvflight.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "你好，世界！今天天气很好。",
    "Emoji: 🌍🚀👩‍👩‍👧 and café, naïve, Ελληνικά",
    "def f(x):\n    return x  # spaces   kept\n",
    "日本語のテキストと한국어 텍스트 mixed with English words.",
]


def _stream(tokenizer, prompt_ids, ids, chunk=1):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(detok.add(ids[i:i + chunk]))
    deltas.append(detok.flush())
    return deltas, detok.text


def test_streamed_deltas_equal_whole_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.encode("Say something:")
    for text in TEXTS:
        ids = tok.encode(text)
        assert any(tok.decode([i]).endswith("\ufffd") for i in ids) or text.startswith("def")
        for chunk in (1, 2, 3):
            deltas, whole = _stream(tok, prompt, ids, chunk)
            assert whole == tok.decode(ids) == text
            assert "".join(deltas) == text
            assert not any("\ufffd" in d for d in deltas), deltas


def test_incomplete_character_flushed_at_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("🚀")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add(ids[:-1]) == ""  # held back: the character is not complete
    assert detok.flush() == tok.decode(ids[:-1])  # the end of the request shows what there is


def test_special_tokens_skipped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("Hello") + [tok.eos_token_id]
    deltas, whole = _stream(tok, [], ids)
    assert whole == "Hello"
