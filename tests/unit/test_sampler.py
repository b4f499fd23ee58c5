"""Tests of kvflight.runner.sampler against a slow per-row plain-python reference."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from kvflight.runner.sampler import Sampler, SamplerOutput, to_token_logprobs
from kvflight.types import Request, SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")
CHI2_LIMIT = 45.0  # df <= 10: P(chi2 > 45) < 1e-5, and every draw is seeded, so no flakes


def make_req(prompt: Sequence[int], output: Sequence[int] = (), *, eos: Sequence[int] = (),
             bad: Sequence[Sequence[int]] = (), rid: str = "r", **sp: object) -> Request:
    sp.setdefault("max_tokens", 1000)
    r = Request(rid, list(prompt), SamplingParams(**sp), eos_token_ids=frozenset(eos))
    r.all_token_ids = list(prompt) + list(output)
    r.bad_words_token_ids = [list(b) for b in bad]
    return r


# ---- the reference: one row at a time, plain python floats -------------------------------------------------------

def ref_process(row: list[float], r: Request) -> list[float]:
    """Penalties, min_tokens and bad words for one row."""
    p = r.sampling_params
    x = list(row)
    vocab = len(x)
    if p.repetition_penalty != 1.0:
        for t in set(r.all_token_ids):
            if t < vocab:
                x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(t for t in r.output_token_ids if t < vocab).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    banned: set[int] = set()
    if r.num_output_tokens < p.min_tokens:
        banned |= set(p.stop_token_ids)
        if not p.ignore_eos:
            banned |= set(r.eos_token_ids)
    hist = r.all_token_ids
    for seq in r.bad_words_token_ids:
        prefix = seq[:-1]
        if len(prefix) <= len(hist) and hist[len(hist) - len(prefix):] == prefix:
            banned.add(seq[-1])
    for t in banned:
        x[t] = NEG_INF
    return x


def ref_distribution(x: list[float], p: SamplingParams) -> dict[int, float]:
    """What one processed row samples from: token -> probability (greedy: the argmax with probability 1)."""
    if p.temperature == 0.0:
        return {max(range(len(x)), key=lambda i: x[i]): 1.0}
    z = [v / p.temperature for v in x]
    m = max(z)
    w = {i: math.exp(v - m) for i, v in enumerate(z) if v != NEG_INF}

    def norm(d: dict[int, float]) -> dict[int, float]:
        s = sum(d.values())
        return {i: v / s for i, v in d.items()}

    probs = norm(w)
    if p.min_p > 0:
        top = max(probs.values())
        probs = norm({i: v for i, v in probs.items() if v >= p.min_p * top})
    if p.top_k > 0:
        probs = norm(dict(sorted(probs.items(), key=lambda kv: -kv[1])[: p.top_k]))
    if p.top_p < 1.0:
        kept: dict[int, float] = {}
        cum = 0.0
        for i, v in sorted(probs.items(), key=lambda kv: -kv[1]):
            kept[i] = v
            cum += v
            if cum >= p.top_p:
                break
        probs = norm(kept)
    return probs


def chi2(counts: Counter, probs: dict[int, float], n: int) -> float:
    assert set(counts) <= set(probs), f"sampled outside the support: {set(counts) - set(probs)}"
    return sum((counts.get(i, 0) - n * q) ** 2 / (n * q) for i, q in probs.items())


def finite_set(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


# ---- greedy, temperature, filters ----------------------------------------------------------------------------------

def test_greedy_is_argmax_and_input_untouched() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    before = logits.clone()
    reqs = [make_req([1, 2, 3], temperature=0.0, rid=f"g{i}") for i in range(8)]
    out = Sampler(CPU)(logits, reqs)
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (8,)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.equal(logits, before)
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature_distribution(temperature: float) -> None:
    row = [1.0, 0.2, -0.5, 2.0, 0.0, -1.5]
    n = 30000
    reqs = [make_req([0], temperature=temperature, rid=f"t{i}") for i in range(n)]
    out = Sampler(CPU, seed=1)(torch.tensor([row] * n), reqs)
    counts = Counter(out.token_ids.tolist())
    want = ref_distribution(row, reqs[0].sampling_params)
    assert chi2(counts, want, n) < CHI2_LIMIT
    # the test can tell temperatures apart: the T=1 distribution is rejected when T != 1
    if temperature != 1.0:
        assert chi2(counts, ref_distribution(row, SamplingParams(temperature=1.0)), n) > 10 * CHI2_LIMIT


def test_seeded_rows_follow_the_distribution() -> None:
    row = [0.5, 1.5, -0.3, 0.9, 0.0]
    n = 4000
    reqs = [make_req([0], temperature=0.9, seed=s, rid=f"s{s}") for s in range(n)]
    out = Sampler(CPU)(torch.tensor([row] * n), reqs)
    counts = Counter(out.token_ids.tolist())
    assert chi2(counts, ref_distribution(row, reqs[0].sampling_params), n) < CHI2_LIMIT
    assert all(isinstance(r.generator, torch.Generator) for r in reqs)


def test_top_k_only_ever_yields_the_k_best() -> None:
    torch.manual_seed(3)
    row = torch.randn(50)
    best5 = set(row.topk(5).indices.tolist())
    n = 3000
    reqs = [make_req([0], temperature=3.0, top_k=5, rid=f"k{i}") for i in range(n)]
    out = Sampler(CPU, seed=2)(row.expand(n, 50).contiguous(), reqs)
    assert set(out.token_ids.tolist()) == best5
    # per-row k, exactly k survivors (no ties here); k=0 and k >= vocab are off
    ks = [1, 3, 0, 7, 50, 100]
    mixed = [make_req([0], temperature=1.0, top_k=k, rid=f"m{k}") for k in ks]
    logits = torch.randn(len(ks), 50)
    filt = Sampler(CPU).filter_logits(logits, mixed)
    for i, k in enumerate(ks):
        kk = 50 if k == 0 or k >= 50 else k
        assert finite_set(filt[i]) == set(logits[i].topk(kk).indices.tolist())


def test_top_k_keeps_tokens_tied_with_the_kth() -> None:
    row = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    filt = Sampler(CPU).filter_logits(row, [make_req([0], temperature=1.0, top_k=2)])
    assert finite_set(filt[0]) == {0, 1, 2, 3}


def test_top_k_then_top_p_renormalises_over_the_top_k() -> None:
    probs = [0.40, 0.30, 0.20, 0.10]
    row = torch.tensor([[math.log(p) for p in probs]])
    # top_k=2 leaves 0.4/0.7 = .571 and .429: top_p=0.5 keeps only token 0, top_p=0.6 both
    for top_p, want in ((0.5, {0}), (0.6, {0, 1}), (0.95, {0, 1})):
        r = make_req([0], temperature=1.0, top_k=2, top_p=top_p)
        assert finite_set(Sampler(CPU).filter_logits(row, [r])[0]) == want


def test_top_p_keeps_the_minimal_nucleus() -> None:
    probs = [0.05, 0.45, 0.12, 0.30, 0.08]  # sorted: 1 (.45), 3 (.75), 2 (.87), 4 (.95), 0 (1.0)
    row = [math.log(p) for p in probs]
    cases = {0.40: {1}, 0.50: {1, 3}, 0.80: {1, 3, 2}, 0.90: {1, 3, 2, 4}, 0.99: {0, 1, 2, 3, 4}, 1.0: {0, 1, 2, 3, 4}}
    reqs = [make_req([0], temperature=1.0, top_p=tp, rid=f"p{tp}") for tp in cases]
    filt = Sampler(CPU).filter_logits(torch.tensor([row] * len(cases)), reqs)
    for i, want in enumerate(cases.values()):
        assert finite_set(filt[i]) == want
        assert want == set(ref_distribution(row, reqs[i].sampling_params))
    # sampling at top_p=0.8 follows the renormalised nucleus
    n = 6000
    reqs = [make_req([0], temperature=1.0, top_p=0.8, rid=f"q{i}") for i in range(n)]
    out = Sampler(CPU, seed=4)(torch.tensor([row] * n), reqs)
    assert chi2(Counter(out.token_ids.tolist()), ref_distribution(row, reqs[0].sampling_params), n) < CHI2_LIMIT


def test_top_p_one_keeps_the_whole_vocabulary_next_to_a_top_p_row() -> None:
    # float32 cumsum over a big vocabulary reaches 1.0 before the tail: top_p=1 must not cut it
    logits = torch.randn(4, 10000, generator=torch.Generator().manual_seed(0)) * 2
    reqs = [make_req([0], temperature=1.0, top_p=1.0 if i else 0.5, rid=f"t{i}") for i in range(4)]
    filt = Sampler(CPU).filter_logits(logits, reqs)
    assert bool(torch.isfinite(filt[1:]).all())


def test_min_p() -> None:
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]
    row = [math.log(p) for p in probs]
    cases = {0.2: {0, 1, 2}, 0.12: {0, 1, 2, 3}, 0.6: {0, 1}, 0.0: {0, 1, 2, 3, 4}}
    reqs = [make_req([0], temperature=1.0, min_p=mp, rid=f"mp{mp}") for mp in cases]
    filt = Sampler(CPU).filter_logits(torch.tensor([row] * len(cases)), reqs)
    for i, want in enumerate(cases.values()):
        assert finite_set(filt[i]) == want == set(ref_distribution(row, reqs[i].sampling_params))
    # min_p is judged after temperature: at T=2 the probs flatten and 0.06 clears 0.2 * max
    hot = make_req([0], temperature=2.0, min_p=0.2)
    assert finite_set(Sampler(CPU).filter_logits(torch.tensor([row]), [hot])[0]) == {0, 1, 2, 3, 4}


# ---- penalties and masks -------------------------------------------------------------------------------------------

def test_penalties_hand_checked() -> None:
    row = torch.tensor([[2.0, -1.0, 3.0, 0.5, 1.0]])
    # token 0 in prompt, 1 in prompt, 2 twice in output, 3 never
    r = make_req([0, 1], [2, 2], repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    got = Sampler(CPU).process_logits(row, [r])[0].tolist()
    assert got == pytest.approx([1.0, -2.0, 3.0 / 2.0 - 1.0 - 0.25, 0.5, 1.0])


def test_penalties_match_reference() -> None:
    g = torch.Generator().manual_seed(5)
    vocab = 40
    logits = torch.randn(6, vocab, generator=g) * 3  # positive and negative
    rng = random.Random(5)
    configs = [dict(repetition_penalty=1.3), dict(presence_penalty=0.5), dict(frequency_penalty=0.7),
               dict(repetition_penalty=0.8, presence_penalty=-0.4, frequency_penalty=1.1), dict(), dict(temperature=0.0,
               repetition_penalty=1.5, frequency_penalty=0.3)]
    reqs = [make_req([rng.randrange(vocab) for _ in range(12)], [rng.randrange(vocab) for _ in range(9)],
                     rid=f"pen{i}", **c) for i, c in enumerate(configs)]
    got = Sampler(CPU).process_logits(logits, reqs)
    for i, r in enumerate(reqs):
        assert got[i].tolist() == pytest.approx(ref_process(logits[i].tolist(), r), rel=1e-6, abs=1e-5)
    assert torch.equal(got[4], logits[4])  # the row without penalties is untouched


def test_penalties_follow_a_growing_history_across_steps() -> None:
    # the sampler caches each request's token ids between steps: new tokens must show up, rewrites too
    vocab = 20
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2)) * 2
    sampler = Sampler(CPU)
    a = make_req([1, 2, 3], rid="a", repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2)
    b = make_req([4] * 70, rid="b", repetition_penalty=0.9, frequency_penalty=-0.5)  # grows past the first buffer
    for step in range(80):
        got = sampler.process_logits(logits, [a, b])
        for i, r in enumerate((a, b)):
            assert got[i].tolist() == pytest.approx(ref_process(logits[i].tolist(), r), rel=1e-6, abs=1e-5)
        a.append_token((step * 7) % vocab)
        b.append_token((step * 3) % 25)  # some ids past the vocabulary
        if step == 40:
            a.all_token_ids = a.all_token_ids[:5]  # history rewritten: the cache must notice
        if step == 60:
            a.all_token_ids[-2] = (a.all_token_ids[-2] + 1) % vocab  # the last token the cache saw


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    eos, stop, other = 2, 3, 5
    row = torch.zeros(1, 8)
    row[0, stop], row[0, eos], row[0, other] = 10.0, 9.0, 8.0
    sampler = Sampler(CPU)
    for n_out in range(5):
        for ignore_eos in (False, True):
            r = make_req([1, 1], [7] * n_out, eos=(eos,), min_tokens=3, stop_token_ids=[stop],
                         ignore_eos=ignore_eos, temperature=0.0)
            tok = sampler(row, [r]).token_ids.item()
            if n_out >= 3:
                assert tok == stop
            else:
                assert tok == (eos if ignore_eos else other)
            proc = sampler.process_logits(row, [r])[0]
            assert proc.tolist() == ref_process(row[0].tolist(), r)


def test_bad_words_single_and_multi_token() -> None:
    vocab = 12
    row = torch.arange(vocab, dtype=torch.float32)[None, :]  # token 11 is the argmax
    sampler = Sampler(CPU)
    bad = [[11], [7, 8, 9], [3, 10]]
    cases = [  # history -> banned ids
        ([1, 2], {11}),
        ([1, 7, 8], {11, 9}),
        ([1, 8], {11}),
        ([7, 8, 1], {11}),
        ([8], {11}),  # prefix longer than the history tail that matches
        ([5, 3], {11, 10}),
    ]
    for hist, banned in cases:
        r = make_req(hist[:1], hist[1:], bad=bad, temperature=0.0)
        proc = sampler.process_logits(row, [r])[0]
        assert {i for i in range(vocab) if proc[i] == NEG_INF} == banned
        assert proc.tolist() == ref_process(row[0].tolist(), r)
        assert sampler(row, [r]).token_ids.item() == max(set(range(vocab)) - banned)


# ---- seeds and logprobs ------------------------------------------------------------------------------------------

def _run_seeded(batch_size: int, row_pos: int, sampler_seed: int, steps: int = 6) -> list[int]:
    """Sample `steps` tokens for a seed=1234 request sitting at row_pos of a batch of noisy neighbours."""
    vocab = 300
    target = make_req([1, 2, 3], temperature=1.3, top_p=0.95, seed=1234, rid="target")
    rng = random.Random(batch_size * 100 + row_pos)
    others = []
    for j in range(batch_size - 1):
        kind = j % 3
        sp = dict(temperature=0.0) if kind == 0 else dict(temperature=0.8, seed=rng.randrange(10**6)) if kind == 1 \
            else dict(temperature=1.1, top_k=20)
        others.append(make_req([4], rid=f"o{j}", **sp))
    sampler = Sampler(CPU, seed=sampler_seed)
    toks = []
    for step in range(steps):
        row = torch.randn(vocab, generator=torch.Generator().manual_seed(step))  # the target's logits per step
        noise = torch.randn(batch_size, vocab, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
        reqs = list(others)
        reqs.insert(row_pos, target)
        logits = noise.clone()
        logits[row_pos] = row
        tok = sampler(logits, reqs).token_ids[row_pos].item()
        toks.append(tok)
        target.append_token(tok)
        for o in others:
            o.append_token(0)
    return toks


def test_seeded_rows_reproducible_across_batches_and_positions() -> None:
    alone = _run_seeded(1, 0, sampler_seed=0)
    assert _run_seeded(5, 2, sampler_seed=7) == alone
    assert _run_seeded(9, 8, sampler_seed=3) == alone
    assert len(set(alone)) > 1  # it really samples
    # another seed gives another sequence
    other = make_req([1, 2, 3], temperature=1.3, top_p=0.95, seed=99)
    seq = []
    for step in range(6):
        row = torch.randn(300, generator=torch.Generator().manual_seed(step))
        seq.append(Sampler(CPU)(row[None], [other]).token_ids.item())
        other.append_token(seq[-1])
    assert seq != alone


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))
    reqs = [make_req([0], temperature=1.0, rid=f"u{i}") for i in range(16)]
    a = Sampler(CPU, seed=11)(logits, reqs).token_ids
    b = Sampler(CPU, seed=11)(logits, reqs).token_ids
    c = Sampler(CPU, seed=12)(logits, reqs).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_logprobs_are_raw_log_softmax_with_ranks() -> None:
    vocab = 30
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(8)) * 2
    raw = torch.log_softmax(logits, dim=-1)
    order = raw.argsort(dim=-1, descending=True)
    reqs = [
        make_req([0], temperature=0.0, logprobs=None, rid="none"),
        make_req([0], temperature=0.0, logprobs=0, rid="zero"),
        make_req([0], temperature=1.0, logprobs=3, rid="three"),
        # greedy, but the two raw best are banned: the sampled token has raw rank 3
        make_req([0], temperature=0.0, logprobs=5, bad=[[order[3, 0].item()], [order[3, 1].item()]], rid="banned"),
        # a big repetition penalty on the raw best moves the pick; logprobs stay raw
        make_req([order[4, 0].item()], temperature=0.0, logprobs=2, repetition_penalty=100.0, rid="pen"),
    ]
    out = Sampler(CPU)(logits, reqs)
    tok = out.token_ids
    assert out.logprobs is not None and out.sampled_ranks is not None
    assert torch.allclose(out.logprobs, raw.gather(1, tok[:, None]).squeeze(1), atol=1e-5)
    assert out.top_token_ids is not None and out.top_logprobs is not None
    assert out.top_token_ids.shape == (5, 5) and out.top_logprobs.dtype == torch.float32
    assert torch.equal(out.top_token_ids, order[:, :5])
    assert torch.allclose(out.top_logprobs, raw.gather(1, order[:, :5]), atol=1e-5)
    assert tok[3].item() == order[3, 2].item()
    assert tok[4].item() == order[4, 1].item()

    tl = to_token_logprobs(out, reqs)
    assert tl[0] is None
    assert tl[1] is not None and tl[1].top == [] and tl[1].sampled.rank == 1
    for i in (1, 2, 3, 4):
        t = tl[i]
        assert t is not None
        k = reqs[i].sampling_params.logprobs
        assert [lp.rank for lp in t.top] == list(range(1, k + 1))
        assert [lp.token_id for lp in t.top] == order[i, :k].tolist()
        assert [lp.logprob for lp in t.top] == pytest.approx(raw[i, order[i, :k]].tolist(), abs=1e-5)
        s = tok[i].item()
        assert t.sampled.token_id == s
        assert t.sampled.logprob == pytest.approx(raw[i, s].item(), abs=1e-5)
        assert t.sampled.rank == 1 + int((raw[i] > raw[i, s]).sum())
    assert tl[3].sampled.rank == 3 and tl[4].sampled.rank == 2


def test_logprobs_zero_alternatives_only() -> None:
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    reqs = [make_req([0], temperature=0.0, logprobs=0, rid="a"), make_req([0], temperature=0.0, rid="b")]
    out = Sampler(CPU)(logits, reqs)
    assert out.logprobs is not None and out.top_token_ids is None and out.top_logprobs is None
    tl = to_token_logprobs(out, reqs)
    assert tl[0] is not None and tl[0].top == [] and tl[1] is None
    assert to_token_logprobs(SamplerOutput(token_ids=out.token_ids), [reqs[1], reqs[1]]) == [None, None]
    with pytest.raises(ValueError, match="logprobs"):
        to_token_logprobs(SamplerOutput(token_ids=out.token_ids), reqs)


def test_sampled_rank_counts_only_strictly_better_tokens() -> None:
    # ties share the best rank: the greedy pick among two equal logits has rank 1, the third token rank 3
    logits = torch.tensor([[2.0, 2.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0]])
    reqs = [make_req([0], temperature=0.0, logprobs=1, rid="a"),
            make_req([0], temperature=0.0, logprobs=1, bad=[[0], [1]], rid="b")]
    tl = to_token_logprobs(Sampler(CPU)(logits, reqs), reqs)
    assert tl[0] is not None and tl[0].sampled.token_id in (0, 1) and tl[0].sampled.rank == 1
    assert tl[1] is not None and tl[1].sampled.token_id == 2 and tl[1].sampled.rank == 3


def test_out_of_vocab_history_ids_are_ignored() -> None:
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0))
    r = make_req([3, 100], [12, 3], eos=(50,), min_tokens=5, stop_token_ids=[99], bad=[[77]],
                 repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.5, temperature=0.0)
    got = Sampler(CPU).process_logits(logits, [r])[0]
    want = logits[0].clone()
    want[3] = (want[3] / 1.5 if want[3] > 0 else want[3] * 1.5) - 0.5 - 0.5
    assert torch.allclose(got, want, atol=1e-6)


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="rows"):
        Sampler(CPU)(torch.zeros(2, 5), [make_req([0])])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(CPU)(torch.zeros(5), [make_req([0])])


# ---- everything at once --------------------------------------------------------------------------------------------

def _random_request(rng: random.Random, vocab: int, i: int) -> Request:
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 10))]
    output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
    sp: dict[str, object] = {}
    if rng.random() < 0.3:
        sp["temperature"] = 0.0
    else:
        sp["temperature"] = rng.choice([0.5, 1.0, 1.5])
        if rng.random() < 0.4:
            sp["top_k"] = rng.randrange(1, 12)
        if rng.random() < 0.4:
            sp["top_p"] = rng.uniform(0.3, 0.95)
        if rng.random() < 0.4:
            sp["min_p"] = rng.uniform(0.01, 0.3)
    if rng.random() < 0.5:
        sp["seed"] = rng.randrange(1000)
    if rng.random() < 0.4:
        sp["repetition_penalty"] = rng.uniform(0.7, 1.6)
    if rng.random() < 0.4:
        sp["presence_penalty"] = rng.uniform(-1, 1)
    if rng.random() < 0.4:
        sp["frequency_penalty"] = rng.uniform(-1, 1)
    if rng.random() < 0.4:
        sp["min_tokens"] = rng.randrange(0, 8)
        sp["stop_token_ids"] = [rng.randrange(vocab)]
        sp["ignore_eos"] = rng.random() < 0.3
    if rng.random() < 0.5:
        sp["logprobs"] = rng.randrange(0, 6)
    bad = []
    if rng.random() < 0.4:
        bad = [[rng.randrange(vocab)], (output or prompt)[-1:] + [rng.randrange(vocab)], [1, 2, 3]]
    return make_req(prompt, output, eos=(0,), bad=bad, rid=f"x{i}", **sp)


@pytest.mark.parametrize("trial", range(8))
def test_mixed_batch_matches_reference(trial: int) -> None:
    rng = random.Random(trial)
    vocab = 24
    n = 16
    reqs = [_random_request(rng, vocab, i) for i in range(n)]
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(trial)) * 2
    sampler = Sampler(CPU, seed=trial)

    processed = sampler.process_logits(logits, reqs)
    refs = [ref_process(logits[i].tolist(), r) for i, r in enumerate(reqs)]
    for i in range(n):
        assert processed[i].tolist() == pytest.approx(refs[i], rel=1e-6, abs=1e-5)
    dists = [ref_distribution(refs[i], r.sampling_params) for i, r in enumerate(reqs)]
    filt = sampler.filter_logits(processed, reqs)
    for i, r in enumerate(reqs):
        if not r.sampling_params.greedy:
            assert finite_set(filt[i]) == set(dists[i])

    out = sampler(logits, reqs)
    toks = out.token_ids.tolist()
    for i, r in enumerate(reqs):
        if r.sampling_params.greedy:
            assert dists[i] == {toks[i]: 1.0}
        else:
            assert toks[i] in dists[i]
    # seeded rows: the same token when sampled alone from a fresh request
    for i, r in enumerate(reqs):
        if r.sampling_params.seed is not None:
            solo = Request(r.request_id, r.prompt_token_ids, r.sampling_params, eos_token_ids=r.eos_token_ids)
            solo.all_token_ids = list(r.all_token_ids)
            solo.bad_words_token_ids = r.bad_words_token_ids
            assert Sampler(CPU, seed=999)(logits[i : i + 1], [solo]).token_ids.item() == toks[i]
    # logprobs: raw, whatever the processing
    raw = torch.log_softmax(logits, dim=-1)
    tl = to_token_logprobs(out, reqs)
    for i, r in enumerate(reqs):
        k = r.sampling_params.logprobs
        if k is None:
            assert tl[i] is None
            continue
        t = tl[i]
        assert t is not None
        assert t.sampled.token_id == toks[i]
        assert t.sampled.logprob == pytest.approx(raw[i, toks[i]].item(), abs=1e-5)
        assert t.sampled.rank == 1 + int((logits[i] > logits[i, toks[i]]).sum())
        assert [lp.token_id for lp in t.top] == (raw[i].topk(k).indices.tolist() if k else [])
        assert [lp.rank for lp in t.top] == list(range(1, k + 1))
