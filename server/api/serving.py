"""What every endpoint shares: the served model, and the one translation of any request into prompt ids and
SamplingParams (validation, limits and generation defaults, each rule written once), over any EngineClient. The
endpoints are modules of their own (completions.py, chat.py, responses.py, tokenize.py), each building its answers
from the typed objects of outputs.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.client import EngineClient, EngineError, ModelInfo
from ..engine.params import InvalidRequest, SamplingParams
from .errors import APIError, error_body
from .job import Job, JobTimeout
from .logprobs import LogprobFormatter
from .metrics import Metrics
from . import tools
from .schemas import MAX_BEAMS, ChatCompletionRequest, _Request
from .streaming import sse, sse_done

if TYPE_CHECKING:
    from ..engine.grammar import Grammar, GrammarCompiler

__all__ = ["ModelInfo", "OpenAIServing", "event_stream", "streaming_response"]

R = TypeVar("R", bound=_Request)
SAMPLING_EPS = 1e-5  # temperatures below this decode greedily


BEAM_FIELDS = ("num_beams", "length_penalty", "early_stopping")
CONSTRAINT_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class OpenAIServing:
    def __init__(self, engine: EngineClient, info: ModelInfo, metrics: Metrics | None = None,
                 timeout: float | None = None, log_prompts: bool = False, responses_store_size: int = 1000) -> None:
        from .responses import ResponseStore

        self.engine = engine
        self.responses = ResponseStore(responses_store_size)
        self.log_prompts = log_prompts
        self.metrics = metrics
        self.timeout = timeout
        self.tokenizer = engine.tokenizer
        self.info = info
        self.logprobs = LogprobFormatter(self.tokenizer, self.token_bytes)
        # The family's own formats are plain text, tokenized like a completion prompt (as the seeds do); a model's
        # Hugging Face template writes its special tokens itself.
        family_template = info.family.chat_template
        self.chat_special_tokens = family_template is not None and self.tokenizer.chat_template == family_template

    # -- structured outputs and tools -------------------------------------------------------
    def grammars(self, param: str) -> GrammarCompiler:
        compiler = self.engine.grammars()
        if isinstance(compiler, str):
            raise InvalidRequest(f"'{param}' needs a grammar, and this model's tokenizer cannot be used for one "
                                 f"({compiler})", param)
        return compiler

    def token_bytes(self, token_id: int) -> bytes:
        compiler = self.engine.grammars()
        if isinstance(compiler, str):
            return self.tokenizer.decode([token_id]).encode()
        return compiler.tokenizer.decode_bytes([token_id])

    def grammar(self, req: _Request, plan: tools.ToolPlan | None) -> Grammar | None:
        """The grammar the answer must follow (run in a worker thread: compiling takes milliseconds), or None.
        A forced tool call follows the call envelope; `auto` with a JSON response_format follows either."""
        c = req.constraint()
        if plan is not None and plan.forced:
            if c is not None:
                raise InvalidRequest(f"'{c.param}' cannot be combined with tool_choice '{plan.choice if plan.choice != 'named' else plan.name}': "
                                     "a forced call's answer is the call", c.param)
            return self.grammars("tools").compile("json_schema", tools.envelope_schema(plan), "tools", tools.strict(plan))
        if c is None:
            return None
        if plan is not None and plan.active:
            if c.kind not in ("json_schema", "json_object"):
                raise InvalidRequest(f"'{c.param}' ({c.kind}) cannot be combined with tools under tool_choice "
                                     "'auto'; only a JSON response_format can", c.param)
            either = {"anyOf": [tools.envelope_schema(plan), c.spec or {"type": "object"}]}
            return self.grammars(c.param).compile("json_schema", either, c.param, c.strict)
        return self.grammars(c.param).compile(c.kind, c.spec, c.param, c.strict)

    # -- requests -> engine ----------------------------------------------------------------
    def check_model(self, req: _Request) -> None:
        if req.model is not None and req.model != self.info.name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.info.name}'", "model", "model_not_found")

    def with_defaults(self, req: R) -> R:
        """Fill the fields a request left unset from the model's generation_config; set fields always win.
        A default beam search is dropped when the request asks for something beams cannot do (sampling, say)."""
        defaults, given = self.info.generation_defaults, req.model_fields_set
        update: dict[str, Any] = {}
        if "max_new_tokens" in defaults and not given & {"max_tokens", "max_completion_tokens"}:
            update["max_tokens"] = defaults["max_new_tokens"]
        asks_beams = "num_beams" in given or req.use_beam_search
        if defaults.get("num_beams", 1) > 1 and not asks_beams:
            beams = {f: defaults[f] for f in BEAM_FIELDS if f in defaults and f not in given}
            try:
                self._num_beams(req.model_copy(update=beams))
                update.update(beams)
            except InvalidRequest:
                pass
        if "num_beams" not in update and (req.num_beams or 1) == 1 and not req.use_beam_search:
            update.update({f: defaults[f] for f in SAMPLING_FIELDS if f in defaults and f not in given})
        return req.model_copy(update=update) if update else req

    def params(self, req: _Request, max_tokens: int | None, prompt_len: int, grammar: Grammar | None = None) -> SamplingParams:
        if max_tokens is None:
            max_tokens = self.info.max_model_len - prompt_len
            if max_tokens < 1:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.info.max_model_len} tokens, and the prompt has {prompt_len}: no room for a completion.",
                    "messages",
                )
        num_beams = self._num_beams(req)
        temperature = 0.0 if num_beams > 1 else 1.0 if req.temperature is None else req.temperature
        if req.min_tokens and req.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens})", "min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if temperature < SAMPLING_EPS else temperature,  # 1e-30 would overflow the logits
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=min(max(req.top_k or 0, 0), len(self.tokenizer)),
            seed=req.seed,
            n=req.n,
            stop=req.stop_list,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            logit_bias=self._logit_bias(req.logit_bias or {}),
            min_tokens=req.min_tokens or 0,
            ignore_eos=bool(req.ignore_eos),
            stop_token_ids=tuple(self.token_ids(req.stop_token_ids or [], "stop_token_ids")),
            logprobs=req.num_logprobs,
            num_beams=num_beams,
            length_penalty=1.0 if req.length_penalty is None else req.length_penalty,
            early_stopping=False if req.early_stopping is None else req.early_stopping,
            prompt_logprobs=req.logprobs if getattr(req, "echo", False) and req.logprobs is not None else None,
            prompt_lookup=req.prompt_lookup,
            grammar=grammar,
        )

    @staticmethod
    def _num_beams(req: _Request) -> int:
        """The beam width, and a 400 naming any field that cannot go with beams."""
        width = req.num_beams or 1
        if req.use_beam_search:
            width = max(width, getattr(req, "best_of", None) or req.n, 2)
        if width == 1:
            return 1
        if width > MAX_BEAMS:
            raise InvalidRequest(f"at most {MAX_BEAMS} beams are allowed, not {width}", "num_beams")
        clashes = {
            "temperature": req.temperature not in (None, 0),
            "top_p": req.top_p not in (None, 1),
            "top_k": req.top_k not in (None, 0, -1),
            "min_p": bool(req.min_p),
            "logprobs": req.num_logprobs is not None,
            "n": req.n > width,
            "best_of": not req.use_beam_search and (getattr(req, "best_of", None) or 1) > 1,
            # each beam would need its own grammar state, copied as beams reorder: not done, so a 400
            "response_format": req.response_format is not None and req.response_format.type != "text",
            **{name: getattr(req, name) is not None for name in CONSTRAINT_FIELDS},
            "tool_choice": getattr(req, "tool_choice", None) not in (None, "none", "auto"),
        }
        for name, clash in clashes.items():
            if clash:
                raise InvalidRequest(f"'{name}' cannot be combined with beam search (num_beams={width})", name)
        return width

    def token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.tokenizer)
        for t in ids:
            if t >= vocab:
                raise InvalidRequest(f"token id {t} in '{param}' is outside the vocabulary (size {vocab})", param)
        return ids

    def _logit_bias(self, bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
        for k in bias:  # not int(): it takes "-1" (the last id, by negative indexing), " 1 ", "+2" and "1_0"
            if not (k.isascii() and k.isdigit()):
                raise InvalidRequest(f"logit_bias keys must be token ids in decimal digits, not {k[:40]!r}", "logit_bias")
        ids = [int(k) for k in bias]
        return tuple(zip(self.token_ids(ids, "logit_bias"), bias.values(), strict=True))

    def prompts(self, prompt: Any) -> list[tuple[list[int], str]]:
        """Each prompt as (token ids, text); the text is what `echo` returns."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        self.engine.check_prompt_count(len(prompt))  # before tokenizing a million of them
        out = []
        for p in prompt:
            ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else self.token_ids(p, "prompt")
            if not ids:
                raise InvalidRequest("prompt must not be empty", "prompt")
            out.append((ids, p if isinstance(p, str) else self.tokenizer.decode(ids)))
        return out

    def tool_plan(self, req: ChatCompletionRequest) -> tools.ToolPlan | None:
        return tools.plan(req.tools, req.tool_choice, req.parallel_tool_calls,
                          getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, req: ChatCompletionRequest, plan: tools.ToolPlan | None, generation_prompt: bool = True,
                    special_tokens: bool | None = None) -> tuple[list[int], str]:
        """The chat's token ids and the text the template made of it (special_tokens: whether the tokenizer adds
        its own, by default as the chat route does)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"the model '{self.info.name}' ({self.info.family.title}) has no chat template: send a prompt to "
                "/v1/completions instead, or start the server with --chat-template FILE",
                "messages",
            )
        messages, extra = tools.chat_messages(req.messages, plan)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                      tokenize=False, **extra)
        except Exception as e:  # a template may refuse a role order, for instance
            raise InvalidRequest(f"the chat template rejected these messages: {e}", "messages") from e
        special = self.chat_special_tokens if special_tokens is None else special_tokens
        return self.tokenizer(text, add_special_tokens=special)["input_ids"], text

    def start(self, prompts: list[list[int]], params: list[SamplingParams], prefix: str, raw: Request) -> Job:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        streams = self.engine.generate_all([(ids, p, f"{rid}-{i}")
                                            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))])
        job = Job(rid, int(time.time()), self.info.name, streams, sum(map(len, prompts)), params[0].n, self.metrics,
                  self.timeout)
        raw.state.job = job  # the request's log line reads its usage
        return job

def event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, as every streaming route answers."""
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def streaming_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Completion and chat chunks, then `data: [DONE]`; an engine failure or timeout mid-stream as an error event."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except EngineError as e:
            yield sse(error_body(500, f"generation failed: {e}"))
        except JobTimeout as e:
            yield sse(error_body(504, str(e), code="timeout"))
        yield sse_done()

    return event_stream(body())


