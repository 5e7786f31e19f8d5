"""Log-probabilities in OpenAI's two shapes: the legacy completions one and the chat one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..engine.request import TokenLogprob
from .outputs import ChatLogprobs, CompletionLogprobs
from .outputs import TokenLogprob as ChatTokenLogprob
from .outputs import TopLogprob


class LogprobFormatter:
    def __init__(self, tokenizer: Any, raw_bytes: Callable[[int], bytes] | None = None) -> None:
        self.tokenizer = tokenizer
        self.raw_bytes = raw_bytes  # a token's own bytes, for tokens that end inside a character

    def bytes(self, token_id: int, token: str) -> list[int]:
        """The token's UTF-8 bytes; a token holding part of a character decodes to U+FFFD, so its bytes come from
        the vocabulary itself (joined over the tokens, they are the text's)."""
        if "\ufffd" in token and self.raw_bytes is not None:
            return list(self.raw_bytes(token_id))
        return list(token.encode())

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, entries: list[TokenLogprob] | None, offset: int = 0) -> CompletionLogprobs | None:
        """OpenAI's legacy shape; text_offset counts from `offset` in the returned text."""
        if entries is None:
            return None
        tokens = [self.token(e.token_id) for e in entries]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[None if e.logprob is None else {self.token(i): lp for i, lp in e.top} for e in entries],
            text_offset=offsets,
        )

    def chat(self, entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            token = self.token(token_id)
            return {"token": token, "logprob": logprob, "bytes": self.bytes(token_id, token)}

        return ChatLogprobs(content=[ChatTokenLogprob(**item(e.token_id, e.logprob),
                                                      top_logprobs=[TopLogprob(**item(i, lp)) for i, lp in e.top])
                                     for e in entries])
