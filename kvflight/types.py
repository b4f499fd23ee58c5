"""Plain data that crosses module boundaries: SamplingParams, Request, SchedulerOutput, StepOutput, RequestOutput."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class FinishReason(str, enum.Enum):
    """Why a request stopped; the values are the OpenAI API's spellings."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_seq_len reached
    ABORT = "abort"  # aborted by the caller (disconnect, timeout, shutdown)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, KV freed, will recompute
    FINISHED = "finished"


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request. Validated on construction: bad values raise ValueError."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to max_seq_len
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (multiplicative)
    presence_penalty: float = 0.0  # subtracted once from logits of tokens seen in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    bad_words: list[str] = field(default_factory=list)  # never generated
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: logprob of the sampled token plus k alternatives
    prompt_logprobs: None = None  # not supported yet; kept so callers get a clear error
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {rule}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "it must be an integer >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "it must be an integer >= 1 (or None for 'up to max_seq_len')")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "it must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"it must be <= max_tokens ({self.max_tokens})")
        if self.temperature < 0:
            raise bad("temperature", "it must be >= 0 (0 means greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", "it must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "it must be an integer >= 0 (0 or -1 turns it off)")
        if not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", "it must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "it must be > 0 (1 turns it off)")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise bad("presence_penalty", "it must be in [-2, 2]")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise bad("frequency_penalty", "it must be in [-2, 2]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "it must be None or an integer in [0, 20]")
        if self.prompt_logprobs is not None:
            raise bad("prompt_logprobs", "prompt logprobs are not supported; leave it None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be integers >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Request:
    """One sequence's whole state. The scheduler mutates it; num_computed_tokens catches up with num_tokens.

    A request with n > 1 is split by the engine into n Requests ("<id>-<i>") that share the prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    max_tokens: int = 0  # resolved output budget (sampling_params.max_tokens or max_seq_len - prompt)
    # mutable state
    status: RequestStatus = RequestStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)  # prompt + outputs
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # filled by the engine
    generator: Any = None  # torch.Generator for seeded sampling, owned by the runner
    # tokens owed by scheduled steps that sample this request but not yet appended to all_token_ids
    # (Scheduler.schedule adds 1, Scheduler.update takes 1 off): at scheduling time at most 1, the last launch's sample,
    # which the scheduler counts as known and the runner reads from that launch's output row on the device
    num_pending_tokens: int = 0
    pending_row: int = -1  # the row of the last launched step's sampled tokens that holds the pending token
    # the sampler reads this request's past tokens (penalties, bad words, min_tokens): it cannot run a step whose
    # previous token is still pending, so the engine completes the step before scheduling the next (set by the engine)
    needs_token_history: bool = False

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        if not self.max_tokens:
            self.max_tokens = self.sampling_params.max_tokens or 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)


@dataclass
class ScheduledRequest:
    """One request's share of an iteration: compute K/V for all_token_ids[start_pos : start_pos + num_new_tokens]."""

    request: Request
    start_pos: int  # == request.num_computed_tokens before the step
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table after this step's allocation
    do_sample: bool  # the step reaches num_tokens: sample the next token
    is_context: bool  # a prompt / recompute chunk rather than one decode token (set by the scheduler)

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start_pos : self.start_pos + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    """What one iteration computes: running requests first, then newly admitted ones, each in FCFS order.

    kv_offloads / kv_loads are host-tier copies the runner executes before the forward: every offload first (they
    read GPU blocks evicted this iteration, which may be reused below), then every load (it writes GPU blocks that
    this iteration's requests attend to). Within each list the destinations are distinct.
    """

    scheduled: list[ScheduledRequest]
    num_scheduled_tokens: int
    preempted_ids: list[str] = field(default_factory=list)
    num_context_requests: int = 0
    num_generation_requests: int = 0
    num_context_tokens: int = 0
    kv_offloads: list[tuple[int, int]] = field(default_factory=list)  # (gpu_block, host_block): GPU -> host
    kv_loads: list[tuple[int, int]] = field(default_factory=list)  # (host_block, gpu_block): host -> GPU

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class Logprob:
    """Log probability of one token under the model's raw distribution."""

    token_id: int
    logprob: float
    rank: int = 0  # 1 = most likely


@dataclass
class TokenLogprobs:
    """The sampled token's logprob plus the top-k alternatives at one position."""

    sampled: Logprob
    top: list[Logprob]


@dataclass
class StepOutput:
    """What one iteration produced for one request (sent to the detokenizer / API process)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass
class CompletionOutput:
    """One of the n completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class RequestOutput:
    """What the offline API returns for one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
