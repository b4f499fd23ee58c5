"""The offline API: LLM(model, **config).generate(prompts, SamplingParams) and .chat(messages)."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from kvflight.config import EngineConfig
from kvflight.engine.engine import Engine
from kvflight.engine.output import OutputProcessor
from kvflight.types import FinishReason, RequestOutput, SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """Runs the engine in this process. Keywords are the config's flat names (max_batch_size=..., ...)."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **settings: Any) -> None:
        base = config.to_flat() if config is not None else {}
        if model is not None:
            base["model"] = model
        base.update(settings)
        self.config = EngineConfig.from_flat(base)
        self.engine = Engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.processor = OutputProcessor(self.tokenizer, self.engine.eos_token_ids)
        self._ids = itertools.count()

    # ---- prompts ------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, or give one with tokenizer=...")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt must be a str or a list of token ids, not {type(prompt).__name__}")

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- generation ---------------------------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams |
                 Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        encoded = [self.encode(p) for p in prompts]
        return self._run([(p if isinstance(p, str) else None, ids) for p, ids in zip(prompts, encoded)], params)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._params_list(sampling_params, len(conversations))
        items = []
        for conv in conversations:
            text = self.apply_chat_template(conv, add_generation_prompt)
            items.append((text, list(self.tokenizer.encode(text, add_special_tokens=False))))
        return self._run(items, params)

    @staticmethod
    def _params_list(sp: Any, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts; pass one, or one per prompt")
        return sp

    def _run(self, items: list[tuple[str | None, list[int]]], params: list[SamplingParams]) -> list[RequestOutput]:
        ids = [f"offline-{next(self._ids)}" for _ in items]
        submitted: list[str] = []
        try:
            for rid, (text, token_ids), sp in zip(ids, items, params):
                requests = self.processor.add_request(rid, text, token_ids, sp)
                submitted.append(rid)
                for req in requests:
                    self.engine.add_request(req)
            results: dict[str, RequestOutput] = {}
            while len(results) < len(ids):
                step_outputs = self.engine.step()
                if not step_outputs and not self.engine.has_unfinished_requests():
                    break
                processed = self.processor.process(step_outputs, only_finished=True)
                for engine_id, stop in processed.stop_string_hits:
                    self.engine.abort_requests([engine_id], FinishReason.STOP)
                for out in processed.outputs:
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            for rid in submitted:
                self.engine.abort_requests(self.processor.engine_ids(rid))
                self.processor.abort(rid)
            raise
        missing = [rid for rid in ids if rid not in results]
        if missing:
            raise RuntimeError(f"engine stopped with {len(missing)} requests unfinished (internal error)")
        return [results[rid] for rid in ids]
