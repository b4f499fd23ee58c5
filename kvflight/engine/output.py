"""Front-end request handling: n-way expansion, detokenization, stop strings, assembling RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kvflight.engine.detokenizer import IncrementalDetokenizer
from kvflight.types import (CompletionOutput, FinishReason, Request, RequestOutput, SamplingParams, StepOutput,
                            TokenLogprobs)


@dataclass
class _Sequence:
    """One of the n completions of a request, as the front-end sees it."""

    engine_id: str
    index: int
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    arrival_time: float
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


def bad_words_to_token_ids(tokenizer: Any, bad_words: list[str]) -> list[list[int]]:
    """Each bad word as token ids, with and without a leading space (the two ways it can appear)."""
    out: list[list[int]] = []
    for word in bad_words:
        for variant in (word, " " + word.lstrip()):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


@dataclass
class ProcessResult:
    outputs: list[RequestOutput]  # one per request that changed; cumulative; .finished when all n are done
    stop_string_hits: list[tuple[str, str]]  # (engine request id, stop string): the engine must finish these


class OutputProcessor:
    """Maps engine StepOutputs back to user requests. Lives in the API process (or in LLM, offline)."""

    def __init__(self, tokenizer: Any | None, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._parents: dict[str, _Parent] = {}
        self._by_engine_id: dict[str, tuple[_Parent, _Sequence]] = {}

    def __len__(self) -> int:
        return len(self._parents)

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> list[Request]:
        """Register a user request; return the n engine Requests to submit (ids '<id>' or '<id>-<i>')."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer; this model has none (pass --tokenizer)")
        bad_ids = bad_words_to_token_ids(self.tokenizer, params.bad_words) if params.bad_words else []
        now = time.monotonic()
        sequences, requests = [], []
        for i in range(params.n):
            engine_id = request_id if params.n == 1 else f"{request_id}-{i}"
            child_params = params
            if params.n > 1:
                child_params = SamplingParams(**{**params.__dict__, "n": 1,
                                                 "seed": None if params.seed is None else params.seed + i})
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            seq = _Sequence(engine_id, i, detok, logprobs=[] if params.logprobs is not None else None)
            sequences.append(seq)
            requests.append(Request(request_id=engine_id, prompt_token_ids=list(prompt_token_ids),
                                    sampling_params=child_params, eos_token_ids=self.eos_token_ids,
                                    arrival_time=now, bad_words_token_ids=bad_ids))
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params, sequences, now)
        self._parents[request_id] = parent
        for seq in sequences:
            self._by_engine_id[seq.engine_id] = (parent, seq)
        return requests

    def engine_ids(self, request_id: str) -> list[str]:
        parent = self._parents.get(request_id)
        return [s.engine_id for s in parent.sequences if s.finish_reason is None] if parent else []

    def process(self, step_outputs: list[StepOutput], only_finished: bool = False) -> ProcessResult:
        """Apply one step's outputs. only_finished: build RequestOutputs for finished requests alone (offline
        callers that never look at partial outputs skip the per-step copies)."""
        touched: dict[str, _Parent] = {}
        hits: list[tuple[str, str]] = []
        now = time.monotonic()
        for so in step_outputs:
            entry = self._by_engine_id.get(so.request_id)
            if entry is None:
                continue  # aborted here already
            parent, seq = entry
            if seq.finish_reason is not None:
                continue
            touched[parent.request_id] = parent
            parent.num_cached_tokens = max(parent.num_cached_tokens, so.num_cached_tokens)
            if so.new_token_ids and parent.first_token_time is None:
                parent.first_token_time = now
            seq.token_ids.extend(so.new_token_ids)
            if seq.logprobs is not None and so.new_logprobs:
                seq.logprobs.extend(lp for lp in so.new_logprobs if lp is not None)
            if seq.detok is not None and so.new_token_ids:
                ids = so.new_token_ids
                if so.finish_reason == FinishReason.STOP and not parent.params.include_stop_str_in_output \
                        and ids and ids[-1] in (self.eos_token_ids | set(parent.params.stop_token_ids)):
                    ids = ids[:-1]  # the EOS / stop token itself is not text
                if ids:
                    seq.detok.add(ids)
                if so.finish_reason is not None:
                    seq.detok.flush()
                seq.text = seq.detok.text
                hit = self._find_stop_string(seq, parent.params)
                if hit is not None and so.finish_reason is None:
                    hits.append((seq.engine_id, hit))
                if hit is not None:
                    seq.finish_reason, seq.stop_reason = FinishReason.STOP, hit
                    continue
            if so.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = so.finish_reason, so.stop_reason
        outputs = []
        for parent in touched.values():
            finished = parent.finished
            if finished or not only_finished:
                outputs.append(self._make_output(parent, now))
            if finished:
                self._drop(parent)
        return ProcessResult(outputs, hits)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark a request aborted (the caller aborts its engine ids); return its final output."""
        parent = self._parents.get(request_id)
        if parent is None:
            return None
        for seq in parent.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = FinishReason.ABORT
        out = self._make_output(parent, time.monotonic())
        self._drop(parent)
        return out

    def _drop(self, parent: _Parent) -> None:
        self._parents.pop(parent.request_id, None)
        for seq in parent.sequences:
            self._by_engine_id.pop(seq.engine_id, None)

    @staticmethod
    def _find_stop_string(seq: _Sequence, params: SamplingParams) -> str | None:
        """Earliest stop string in the text; truncates seq.text at it (or after it if included)."""
        best: tuple[int, str] | None = None
        for stop in params.stop:
            pos = seq.text.find(stop)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return None
        pos, stop = best
        seq.text = seq.text[: pos + len(stop)] if params.include_stop_str_in_output else seq.text[:pos]
        return stop

    def _make_output(self, parent: _Parent, now: float) -> RequestOutput:
        holdback = max((len(s) for s in parent.params.stop), default=1) - 1
        completions = []
        for seq in parent.sequences:
            text = seq.text
            if seq.finish_reason is None and holdback:
                text = text[: max(0, len(text) - holdback)]  # may still turn out to be the start of a stop string
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.token_ids),
                finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                stop_reason=seq.stop_reason, logprobs=seq.logprobs))
        finished = parent.finished
        if finished and parent.finish_time is None:
            parent.finish_time = now
        metrics = {"arrival_time": parent.arrival_time}
        if parent.first_token_time is not None:
            metrics["ttft_s"] = parent.first_token_time - parent.arrival_time
        if parent.finish_time is not None:
            metrics["e2e_s"] = parent.finish_time - parent.arrival_time
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions, finished=finished,
                             num_cached_tokens=parent.num_cached_tokens, metrics=metrics)
