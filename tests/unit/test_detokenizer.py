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


def test_rust_stream_equals_windowed_decode(smollm2_tokenizer, monkeypatch):
    """The tokenizers-library stream (fast tokenizers) and the windowed Python decode give the same text on random
    ids (byte tokens that never complete a character, special tokens) and on real text, token by token the same
    deltas; fed three tokens at a time the stream may release a finished character one call earlier."""
    import random

    from kvflight.engine import detokenizer

    tok = smollm2_tokenizer
    rng = random.Random(7)
    prompt = tok.encode("Say something:")
    specials = [tok.eos_token_id] + list(getattr(tok, "all_special_ids", []))[:3]
    cases = [tok.encode(t) for t in TEXTS]
    cases += [[rng.choice(specials) if rng.random() < 0.05 else rng.randrange(tok.vocab_size) for _ in range(120)]
              for _ in range(12)]
    for skip in (True, False):
        for ids in cases:
            for chunk in (1, 3):
                got = []
                for use_stream in (True, False):
                    monkeypatch.setattr(detokenizer, "USE_DECODE_STREAM", use_stream)
                    detok = IncrementalDetokenizer(tok, prompt, skip)
                    assert (detok._stream is not None) == use_stream  # the fast path is really taken
                    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
                    got.append((deltas, detok.text))
                (stream_deltas, stream_text), (window_deltas, window_text) = got
                assert stream_text == window_text and "".join(stream_deltas) == stream_text, (skip, chunk, ids[:10])
                if chunk == 1:
                    assert stream_deltas == window_deltas, (skip, ids[:10])
                else:  # a chunk's finished characters may come out before the window's would release them
                    assert all("\ufffd" not in d for d in stream_deltas[:-1]) or \
                        any("\ufffd" in d for d in window_deltas[:-1])
