"""Request bodies of the HTTP API (OpenAI completions / chat, Triton generate) as pydantic models, and their
mapping to SamplingParams. Unknown fields are ignored, wrong types fail validation (-> HTTP 400)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from kvflight.types import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAISampling(_Body):
    """Fields common to completions and chat."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    user: str | None = None

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        kwargs: dict[str, Any] = dict(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0, repetition_penalty=1.0 if self.repetition_penalty is None
            else self.repetition_penalty, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            bad_words=list(self.bad_words or []))
        return SamplingParams(**kwargs)


class CompletionRequest(_OpenAISampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs)


class ChatMessage(_Body):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, logprobs)


class TritonGenerateRequest(_Body):
    """Triton / TensorRT-LLM ensemble `generate` body (scalars; a one-element list is accepted too)."""

    text_input: Union[str, list[str]]
    max_tokens: int = 16
    bad_words: Union[str, list[str], None] = None
    stop_words: Union[str, list[str], None] = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    random_seed: int | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    end_id: int | None = None
    pad_id: int | None = None  # accepted, ignored (no padding here)
    stream: bool = False

    def prompt_text(self) -> str:
        if isinstance(self.text_input, list):
            if len(self.text_input) != 1:
                raise ValueError("text_input: send one string (batching several in one request is not supported)")
            return self.text_input[0]
        return self.text_input

    def sampling_params(self) -> SamplingParams:
        def words(v: str | list[str] | None) -> list[str]:
            return [v] if isinstance(v, str) and v else [w for w in (v or []) if w]

        seed = self.random_seed if self.random_seed is not None else self.seed
        return SamplingParams(max_tokens=self.max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, seed=seed, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
                              stop=words(self.stop_words), bad_words=words(self.bad_words),
                              stop_token_ids=[self.end_id] if self.end_id is not None else [],
                              ignore_eos=self.ignore_eos)


class ErrorDetail(_Body):
    message: str
    type: Literal["invalid_request_error", "authentication_error", "server_error", "service_unavailable",
                  "timeout_error"] = "invalid_request_error"
    param: str | None = None
    code: str | int | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
