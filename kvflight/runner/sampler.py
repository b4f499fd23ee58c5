"""The batched sampler: one step's logits -> next tokens (penalties, masks, temperature, min-p/top-k/top-p, seeds)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from kvflight.types import Logprob, Request, TokenLogprobs

_NEG_INF = float("-inf")

# Columns of the per-step parameter table (one float32 row per request).
_TEMP, _TOP_K, _TOP_P, _MIN_P, _REP, _PRES, _FREQ, _GREEDY = range(8)
_NUM_COLS = 8
_EMPTY_IDS = np.empty(0, dtype=np.int64)


@dataclass
class SamplerOutput:
    """What one step sampled; every tensor lives on the sampler's device (nothing has been copied to the host)."""

    token_ids: torch.Tensor  # [num_rows] int64
    # logprob of the sampled token under the RAW model distribution (log_softmax of the input logits);
    # None when no row asked for logprobs
    logprobs: torch.Tensor | None = None  # [num_rows] float32
    top_token_ids: torch.Tensor | None = None  # [num_rows, k_max] int64, raw top-k; None if k_max == 0
    top_logprobs: torch.Tensor | None = None  # [num_rows, k_max] float32
    # rank of the sampled token in the raw distribution (1 = most likely); set together with logprobs
    sampled_ranks: torch.Tensor | None = None  # [num_rows] int64


class _TokenBuffer:
    """One request's all_token_ids as a growing int64 array, so a step converts only the new tokens.

    Relies on all_token_ids being append-only (Request.append_token); if it shrank or its last converted
    token changed, the buffer starts over.
    """

    __slots__ = ("ids", "n")

    def __init__(self) -> None:
        self.ids = np.empty(64, dtype=np.int64)  # [capacity]
        self.n = 0

    def sync(self, toks: list[int]) -> np.ndarray:
        total = len(toks)
        if total < self.n or (self.n and toks[self.n - 1] != self.ids[self.n - 1]):
            self.n = 0
        if total > self.n:
            if total > len(self.ids):
                grown = np.empty(max(total, 2 * len(self.ids)), dtype=np.int64)
                grown[: self.n] = self.ids[: self.n]
                self.ids = grown
            self.ids[self.n : total] = toks[self.n :]
            self.n = total
        return self.ids[:total]  # [num_tokens]


def _bad_word_banned(r: Request) -> list[int]:
    """Last ids of r.bad_words_token_ids whose prefix (all but the last id) ends r.all_token_ids."""
    banned: list[int] = []
    toks = r.all_token_ids
    for seq in r.bad_words_token_ids:
        if not seq:
            continue
        k = len(seq) - 1
        if k == 0 or (k <= len(toks) and toks[-k:] == seq[:-1]):
            banned.append(seq[-1])
    return banned


@dataclass
class _Batch:
    """One step's view of the requests: python flags say which stages run; the tensors live on the device."""

    num_rows: int
    vocab_size: int
    any_greedy: bool = False
    all_greedy: bool = True
    use_rep: bool = False
    use_pres_freq: bool = False
    use_min_p: bool = False
    use_top_k: bool = False
    use_top_p: bool = False
    max_logprobs: int = -1  # -1: no row asked for logprobs
    seeded_rows: list[int] = field(default_factory=list)  # sampled (not greedy) rows with a seed
    # [rows, _NUM_COLS] float32, greedy rows holding neutral filter values; None when nothing reads it
    table: torch.Tensor | None = None
    # linear indices into [count_rows, vocab + 1] of every penalised token: count rows 0..rows-1 count the
    # outputs, rows..2*rows-1 (only with repetition penalty) the prompts; column `vocab` swallows bad ids
    token_index: torch.Tensor | None = None  # [num_tokens] int64
    num_count_rows: int = 0
    mask_index: torch.Tensor | None = None  # [2, num_masked] int64: (row, token) pairs set to -inf


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x [rows, vocab] -> [rows] int64 first index of each row's maximum (the Triton kernel on a GPU)."""
    if x.is_cuda:
        from kvflight.kernels.argmax import argmax_rows

        return argmax_rows(x)
    return x.argmax(dim=-1)


def _check_inputs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    if logits.dim() != 2:
        raise ValueError(f"logits has shape {tuple(logits.shape)}: the sampler needs [num_rows, vocab_size]")
    if logits.shape[0] != len(requests):
        raise ValueError(
            f"logits has {logits.shape[0]} rows but {len(requests)} requests were given: "
            "pass exactly one request per logits row, in row order")
    if logits.dtype != torch.float32:
        logits = logits.float()
    return logits


def _apply_penalties(x: torch.Tensor, b: _Batch) -> torch.Tensor:
    """Repetition (prompt + output, multiplicative), then frequency and presence (output only, additive)."""
    if b.token_index is None:
        return x
    assert b.table is not None
    rows, vocab = x.shape
    counts = torch.zeros(b.num_count_rows * (vocab + 1), dtype=x.dtype, device=x.device)  # [count_rows * (vocab+1)]
    counts.scatter_add_(0, b.token_index, torch.ones(b.token_index.shape[0], dtype=x.dtype, device=x.device))
    counts = counts.view(b.num_count_rows, vocab + 1)
    out_counts = counts[:rows, :vocab]  # [rows, vocab]
    if b.use_rep:
        seen = (counts[rows:, :vocab] > 0) | (out_counts > 0)  # [rows, vocab] in prompt or output
        rep = b.table[:, _REP : _REP + 1]  # [rows, 1]
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    if b.use_pres_freq:
        freq = b.table[:, _FREQ : _FREQ + 1]  # [rows, 1]
        pres = b.table[:, _PRES : _PRES + 1]  # [rows, 1]
        x = x - freq * out_counts - pres * (out_counts > 0).to(x.dtype)
    return x


def _apply_token_masks(x: torch.Tensor, b: _Batch) -> torch.Tensor:
    """-inf on EOS / stop ids while min_tokens is not reached, and on the last id of matching bad words."""
    if b.mask_index is None:
        return x
    return x.index_put((b.mask_index[0], b.mask_index[1]), x.new_full((1,), _NEG_INF))


def _apply_filters(x: torch.Tensor, b: _Batch) -> torch.Tensor:
    """Temperature, then min_p, top_k, top_p (each renormalised over what the previous ones kept). -inf = dropped."""
    vocab = x.shape[1]
    if b.table is None:  # all greedy: nothing to filter
        return x
    x = x / b.table[:, _TEMP : _TEMP + 1]  # [rows, vocab]
    if b.use_min_p:
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps everything
        max_x = x.amax(dim=-1, keepdim=True)  # [rows, 1]
        x = x.masked_fill(x < max_x + torch.log(b.table[:, _MIN_P : _MIN_P + 1]), _NEG_INF)
    if b.use_top_k or b.use_top_p:
        # One sort gives how many tokens each row keeps; the mask is then "below the row's threshold logit" in
        # the original order (no scatter back). Tokens tied with the threshold are all kept.
        xs = x.sort(dim=-1, descending=True).values  # [rows, vocab]
        keep = None  # [rows] int64, tokens kept per row (>= 1)
        if b.use_top_k:
            k = b.table[:, _TOP_K].long()  # [rows]
            keep = torch.where((k <= 0) | (k > vocab), vocab, k)
        if b.use_top_p:
            ps = xs.softmax(dim=-1)  # [rows, vocab]
            cum = ps.cumsum(dim=-1)  # [rows, vocab]
            top_p = b.table[:, _TOP_P]  # [rows]
            # top_p of the mass left by top_k: the nucleus is renormalised over the top-k tokens
            budget = top_p if keep is None else top_p * cum.gather(1, (keep - 1)[:, None]).squeeze(1)  # [rows]
            # keep token j iff the strictly more likely tokens hold less than the budget (j = 0 always)
            n_p = ((cum - ps) < budget[:, None]).sum(dim=-1).clamp(min=1)  # [rows]
            n_p = torch.where(top_p < 1.0, n_p, vocab)  # top_p = 1: off (no float noise on the tail)
            keep = n_p if keep is None else torch.minimum(keep, n_p)
        assert keep is not None
        threshold = xs.gather(1, (keep - 1)[:, None])  # [rows, 1]
        x = x.masked_fill(x < threshold, _NEG_INF)
    return x


class Sampler:
    """Samples one token per row. Holds the generator of unseeded rows; seeded rows use r.generator (created lazily)."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # per-request token-id arrays for the penalties, dropped with their request
        self._token_buffers: weakref.WeakKeyDictionary[Request, _TokenBuffer] = weakref.WeakKeyDictionary()
        # CUDA: two persistent pinned staging buffers used in turn (one async copy per step; with asynchronous
        # scheduling step N+1 is prepared while step N's copy may still wait behind step N-1), each with the event
        # of its last copy
        self._pinned: list[torch.Tensor | None] = [None, None]  # [capacity] int64 each
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    # ---- public stages (also what the tests compare against a per-row reference) -------------------------

    def process_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Steps 2-4: penalties, min_tokens and bad-words masks: new logits [num_rows, vocab], the input untouched."""
        logits = _check_inputs(logits, requests)
        b = self._prepare(requests, logits.shape[1], logits.device)
        return _apply_token_masks(_apply_penalties(logits, b), b)

    def filter_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Step 6 without the draw: temperature + min_p/top_k/top_p on already processed logits ([num_rows, vocab]).
        Greedy rows come back unchanged."""
        logits = _check_inputs(logits, requests)
        return _apply_filters(logits, self._prepare(requests, logits.shape[1], logits.device))

    # ---- the hot path -------------------------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        logits = _check_inputs(logits, requests)  # [rows, vocab] float32, never written in place
        b = self._prepare(requests, logits.shape[1], logits.device)

        x = _apply_token_masks(_apply_penalties(logits, b), b)  # [rows, vocab]
        greedy_ids = _argmax(x) if b.any_greedy else None  # [rows]
        if b.all_greedy:
            assert greedy_ids is not None
            token_ids = greedy_ids
        else:
            token_ids = self._draw(_apply_filters(x, b), requests, b)  # [rows]
            if greedy_ids is not None:
                assert b.table is not None
                token_ids = torch.where(b.table[:, _GREEDY] > 0, greedy_ids, token_ids)
        out = SamplerOutput(token_ids=token_ids)
        if b.max_logprobs >= 0:
            _fill_logprobs(out, logits, b.max_logprobs)
        return out

    def _draw(self, x: torch.Tensor, requests: list[Request], b: _Batch) -> torch.Tensor:
        """argmax(probs / q), q ~ Exponential(1): a draw from softmax(x). Seeded rows draw their own q row."""
        probs = x.softmax(dim=-1)  # [rows, vocab]
        q = torch.empty_like(probs)  # [rows, vocab]
        if len(b.seeded_rows) < b.num_rows:
            q.exponential_(generator=self.generator)  # one shared draw; seeded rows are overwritten below
        else:
            q.fill_(1.0)
        for i in b.seeded_rows:
            r = requests[i]
            if r.generator is None:
                r.generator = torch.Generator(device=x.device).manual_seed(r.sampling_params.seed)
            q[i].exponential_(generator=r.generator)
        return _argmax(probs.div_(q))

    # ---- host side: one pass over the rows, one host->device copy -----------------------------------------

    def _prepare(self, requests: list[Request], vocab: int, device: torch.device) -> _Batch:
        b = _Batch(num_rows=len(requests), vocab_size=vocab)
        params: list[tuple[float, ...]] = []
        outputs: list[np.ndarray] = []  # per row: output ids of rows with any penalty
        prompts: list[np.ndarray] = []  # per row: prompt ids of rows with a repetition penalty
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        buffers = self._token_buffers
        for i, r in enumerate(requests):
            p = r.sampling_params
            if p.temperature == 0.0:
                b.any_greedy = True
                params.append((1.0, 0.0, 1.0, 0.0, p.repetition_penalty, p.presence_penalty, p.frequency_penalty, 1.0))
            else:
                b.all_greedy = False
                b.use_min_p |= p.min_p > 0.0
                b.use_top_k |= 0 < p.top_k < vocab
                b.use_top_p |= p.top_p < 1.0
                if p.seed is not None:
                    b.seeded_rows.append(i)
                params.append((p.temperature, float(p.top_k), p.top_p, p.min_p,
                               p.repetition_penalty, p.presence_penalty, p.frequency_penalty, 0.0))
            if p.logprobs is not None and p.logprobs > b.max_logprobs:
                b.max_logprobs = p.logprobs
            rep_on = p.repetition_penalty != 1.0
            add_on = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            if rep_on or add_on:
                b.use_rep |= rep_on
                b.use_pres_freq |= add_on
                buf = buffers.get(r)
                if buf is None:
                    buf = buffers[r] = _TokenBuffer()
                ids = buf.sync(r.all_token_ids)  # [num_tokens]
                n_prompt = len(r.prompt_token_ids)
                outputs.append(ids[n_prompt:])
                prompts.append(ids[:n_prompt] if rep_on else _EMPTY_IDS)
            else:
                outputs.append(_EMPTY_IDS)
                prompts.append(_EMPTY_IDS)
            if p.min_tokens and len(r.all_token_ids) - len(r.prompt_token_ids) < p.min_tokens:
                for t in p.stop_token_ids if p.ignore_eos else (*p.stop_token_ids, *r.eos_token_ids):
                    if 0 <= t < vocab:
                        mask_rows.append(i)
                        mask_cols.append(t)
            if r.bad_words_token_ids:
                for t in _bad_word_banned(r):
                    if 0 <= t < vocab:
                        mask_rows.append(i)
                        mask_cols.append(t)
        self._upload(b, params, outputs + prompts if b.use_rep else outputs, mask_rows, mask_cols, device)
        return b

    def _upload(self, b: _Batch, params: list[tuple[float, ...]], count_arrays: list[np.ndarray],
                mask_rows: list[int], mask_cols: list[int], device: torch.device) -> None:
        """Pack the step's host data into one int64 buffer, copy it once, and cut the device views out of it.

        Layout: [table as float64 bits: rows * _NUM_COLS | count-row lengths | token ids | mask rows | mask cols].
        """
        rows = b.num_rows
        need_table = not b.all_greedy or b.use_rep or b.use_pres_freq
        need_counts = b.use_rep or b.use_pres_freq
        n_table = rows * _NUM_COLS if need_table else 0
        lens = _EMPTY_IDS  # [count_rows] tokens per count row
        if need_counts:
            lens = np.fromiter(map(len, count_arrays), dtype=np.int64, count=len(count_arrays))
        n_tokens = int(lens.sum())
        n_mask = len(mask_rows)
        size = n_table + len(lens) + n_tokens + 2 * n_mask
        if size == 0:
            return
        host = self._staging(size, device)  # [size] int64
        o_lens = n_table
        o_tok = o_lens + len(lens)
        o_mask = o_tok + n_tokens
        if n_table:
            host[:n_table].view(np.float64).reshape(rows, _NUM_COLS)[:] = params
        host[o_lens:o_tok] = lens
        if n_tokens:
            np.concatenate(count_arrays, out=host[o_tok:o_mask])
        if n_mask:
            host[o_mask : o_mask + n_mask] = mask_rows
            host[o_mask + n_mask : size] = mask_cols
        dev = self._copy(host, size, device)  # [size] int64 on the device

        vocab = b.vocab_size
        if n_table:
            b.table = dev[:n_table].view(torch.float64).view(rows, _NUM_COLS).to(torch.float32)
        if need_counts:
            b.num_count_rows = len(lens)
            ids = dev[o_tok:o_mask]  # [n_tokens]
            ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
            row_of = torch.repeat_interleave(torch.arange(len(lens), device=device), dev[o_lens:o_tok],
                                             output_size=n_tokens)  # [n_tokens]; output_size: no sync
            b.token_index = row_of * (vocab + 1) + ids
        if n_mask:
            b.mask_index = dev[o_mask:size].view(2, n_mask)

    def _staging(self, size: int, device: torch.device) -> np.ndarray:
        if device.type != "cuda":
            return np.empty(size, dtype=np.int64)  # fresh: the CPU "copy" below aliases it
        self._turn ^= 1
        k = self._turn
        copied = self._copied[k]
        if copied is not None and not copied.query():
            copied.synchronize()  # this buffer's copy (two steps ago) still reads it (not seen in practice)
        pinned = self._pinned[k]
        if pinned is None or pinned.numel() < size:
            cap = max(size, 2 * (0 if pinned is None else pinned.numel()), 1 << 16)
            self._pinned[k] = torch.empty(cap, dtype=torch.int64, pin_memory=True)
        return self._pinned[k].numpy()[:size]

    def _copy(self, host: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return torch.from_numpy(host)
        k = self._turn
        pinned = self._pinned[k]
        if device.type != "cuda" or pinned is None:
            return torch.from_numpy(host).to(device)
        dev = pinned[:size].to(device, non_blocking=True)
        if self._copied[k] is None:
            self._copied[k] = torch.cuda.Event()
        self._copied[k].record()
        return dev


def _fill_logprobs(out: SamplerOutput, logits: torch.Tensor, k_max: int) -> None:
    """Raw-distribution logprob and rank of the sampled tokens, and the raw top-k_max alternatives."""
    lse = torch.logsumexp(logits, dim=-1)  # [rows]
    sampled_logit = logits.gather(1, out.token_ids[:, None])  # [rows, 1]
    out.logprobs = sampled_logit.squeeze(1) - lse  # [rows]
    out.sampled_ranks = (logits > sampled_logit).sum(dim=-1) + 1  # [rows] int64
    if k_max > 0:
        top_vals, top_ids = logits.topk(min(k_max, logits.shape[1]), dim=-1)  # [rows, k_max] each
        out.top_token_ids = top_ids
        out.top_logprobs = top_vals - lse[:, None]


def logprobs_table(out: SamplerOutput) -> torch.Tensor | None:
    """The rows' logprob data as one device tensor [rows, 3 + 2 * k_max] float64 (sampled id, its logprob, its rank,
    top ids, top logprobs), ready for one device->host copy; None when no row asked for logprobs."""
    if out.logprobs is None or out.sampled_ranks is None:
        return None
    cols = [out.token_ids[:, None], out.logprobs[:, None], out.sampled_ranks[:, None]]  # [rows, 1] each
    if out.top_token_ids is not None and out.top_logprobs is not None:
        cols += [out.top_token_ids, out.top_logprobs]  # [rows, k_max] each
    # float64 holds int ids / ranks (< 2**53) and float32 logprobs exactly
    return torch.cat([c.to(torch.float64) for c in cols], dim=1)


def token_logprobs_from_table(host: list[list[float]], requests: list[Request]) -> list[TokenLogprobs | None]:
    """Per-row TokenLogprobs from logprobs_table's rows (on the host); None for rows without logprobs."""
    k_max = (len(host[0]) - 3) // 2 if host else 0
    result: list[TokenLogprobs | None] = []
    for row, r in zip(host, requests):
        k = r.sampling_params.logprobs
        if k is None:
            result.append(None)
            continue
        sampled = Logprob(token_id=int(row[0]), logprob=row[1], rank=int(row[2]))
        # min(): a vocabulary smaller than k has fewer alternatives than asked for
        top = [Logprob(token_id=int(row[3 + j]), logprob=row[3 + k_max + j], rank=j + 1) for j in range(min(k, k_max))]
        result.append(TokenLogprobs(sampled=sampled, top=top))
    return result


def to_token_logprobs(out: SamplerOutput, requests: list[Request]) -> list[TokenLogprobs | None]:
    """Per-row TokenLogprobs (None for rows without sampling_params.logprobs), with one device->host copy."""
    num_rows = out.token_ids.shape[0]
    if len(requests) != num_rows:
        raise ValueError(f"SamplerOutput has {num_rows} rows but {len(requests)} requests were given: "
                         "pass the same requests, in the same order, as to the Sampler")
    if all(r.sampling_params.logprobs is None for r in requests):
        return [None] * num_rows
    table = logprobs_table(out)
    if table is None:
        raise ValueError("SamplerOutput.logprobs is None but a request asks for logprobs: "
                         "pass the same requests as to the Sampler call that produced this output")
    return token_logprobs_from_table(table.cpu().tolist(), requests)
