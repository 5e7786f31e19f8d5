"""Structured outputs: grammars compiled by llguidance, and the decode-pipeline processor that enforces one.

A request's constraint (a JSON schema, any JSON object, a regex, a choice of strings or a Lark grammar) is compiled
once per distinct text, off the engine thread, into a matcher kept as a prototype (`GrammarCompiler.compile`, an
LRU cache). Each row that uses it gets its own copy: before sampling it masks the row's logits to the tokens the
grammar allows next, and it advances with each token the row takes. When the grammar can take nothing more the row
ends ("stop"); a row that reaches max_tokens first ends with "length", its text cut short of the grammar's end.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.torch
import torch

from .decoding import Processor
from .params import InvalidRequest

log = logging.getLogger(__name__)
CACHE_SIZE = 256  # compiled grammars kept, by their text
BITS = torch.arange(32, dtype=torch.int32)
LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # errors without the parser state and the whole grammar


def short(error: str) -> str:
    return error.split("\n<state>")[0].strip()[:500]


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled constraint; `processor()` gives a row its own matcher."""

    kind: str  # json_schema, json_object, regex, choice or grammar
    prototype: Any  # an llguidance.LLMatcher that never consumes a token
    words: int  # int32 words of the token bitmask

    def processor(self) -> GrammarMask:
        return GrammarMask(self.prototype.deep_copy(), self.words)


class GrammarMask(Processor):
    def __init__(self, matcher: Any, words: int) -> None:
        self.matcher = matcher
        self.mask = torch.zeros((1, words), dtype=torch.int32)

    def apply(self, logits, seq):
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        if self.matcher.is_error():  # a resource limit hit while computing the mask: no token is known to be valid
            raise RuntimeError(f"the grammar could not compute the next tokens: {short(self.matcher.get_error())}")
        vocab = logits.shape[-1]
        mask = self.mask[0].to(logits.device, non_blocking=True)
        allowed = ((mask.unsqueeze(1) >> BITS.to(mask.device)) & 1).reshape(-1)[:vocab].bool()
        logits.masked_fill_(~allowed, float("-inf"))

    def accept(self, seq, token):
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {short(self.matcher.get_error())}")
        return self.matcher.is_stopped()

    def accepting(self) -> bool:
        return self.matcher.is_accepting()


def llguidance_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> Any:
    """llguidance's view of a fast Hugging Face tokenizer. It tokenizes text the grammar forces as a continuation
    of the answer, so the tokenizer must not add what it adds at the start of a text: a SentencePiece-style
    tokenizer (PolyLM's, Llama's) prepends "▁", and "\"" would come out as ["▁", "\""], making a lone space the
    only token allowed where the grammar wants the quote."""
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    _no_text_start(spec)
    return llguidance.LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=sorted(eos_ids))


def _no_text_start(node: Any) -> Any:
    """Drop the start-of-text rules from a tokenizer.json: Metaspace prepending, a Prepend normalizer, and regex
    replacements anchored at the start (\\A)."""
    if isinstance(node, list):
        return [n for n in (_no_text_start(n) for n in node) if n is not None]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend" or (kind == "Replace" and str(node.get("pattern", {}).get("Regex", "")).startswith("\\A")):
        return None
    if kind == "Metaspace":
        node["prepend_scheme"], node["add_prefix_space"] = "never", False
    for key, value in list(node.items()):
        if isinstance(value, (dict, list)) and key not in ("model", "added_tokens"):
            node[key] = _no_text_start(value)
    return node


def json_options(strict: bool) -> dict:
    """JSON on one line, `{"a": 1, "b": [2, 3]}`: free whitespace lets a small model pad an answer with newlines
    until max_tokens. A schema's own "x-guidance" options win."""
    return {"whitespace_flexible": False, "lenient": not strict}


def choice_grammar(choices: list[str]) -> str:
    """A Lark grammar for exactly one of the strings."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe, cached by (kind, text, strict)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], vocab_size: int) -> None:
        self.tokenizer = llguidance_tokenizer(tokenizer, vocab_size, eos_ids)
        self.words = (self.tokenizer.vocab_size + 31) // 32
        self._cache: OrderedDict[tuple, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, kind: str, spec: Any, param: str, strict: bool = True) -> Grammar:
        """The grammar for `spec`; raises InvalidRequest naming `param` with llguidance's reason if it cannot be
        compiled. A JSON schema under strict=False compiles leniently: keywords llguidance does not support are
        dropped with a warning in the log (under strict=True they are a 400)."""
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True, ensure_ascii=False)
        key = (kind, text, strict)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(kind, self._matcher(kind, spec, param, strict), self.words)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _matcher(self, kind: str, spec: Any, param: str, strict: bool) -> Any:
        try:
            if kind in ("json_schema", "json_object"):
                schema = {"type": "object"} if kind == "json_object" else spec
                text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=json_options(strict))
            elif kind == "regex":
                text = llguidance.LLMatcher.grammar_from_regex(spec)
            elif kind == "choice":
                text = llguidance.LLMatcher.grammar_from_lark(choice_grammar(spec))
            else:
                text = llguidance.LLMatcher.grammar_from_lark(spec)
        except Exception as e:  # anything the library says of what the client sent is the client's to fix
            raise InvalidRequest(f"'{param}' could not be compiled: {short(str(e))}", param) from e
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer, limits=LIMITS)
        if failed:
            reason = short(messages[0]) if messages else "unknown error"
            hint = ""
            if strict and kind == "json_schema" and not self._lenient_fails(spec):
                hint = " (a keyword the grammar library does not support: with strict false it is dropped)"
            raise InvalidRequest(f"'{param}' could not be compiled: {reason}{hint}", param)
        for message in messages:
            log.warning("%s: %s (ignored, as strict is false)", param, message)
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0, limits=LIMITS)
        if not matcher.is_error():
            first = torch.zeros((1, self.words), dtype=torch.int32)
            llguidance.torch.fill_next_token_bitmask(matcher, first, 0)
            if not matcher.is_error() and not bool(first.any()):
                raise InvalidRequest(f"'{param}' admits no answer: no token can start it", param)
        if matcher.is_error():
            raise InvalidRequest(f"'{param}' could not be compiled: {short(matcher.get_error())}", param)
        return matcher

    def _lenient_fails(self, schema: Any) -> bool:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=json_options(False))
        return llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)[0]
