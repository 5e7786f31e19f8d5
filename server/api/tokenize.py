"""POST /tokenize and /detokenize (vLLM's routes): count and trim context with the tokens the server will use."""

from __future__ import annotations

import asyncio

from fastapi.responses import Response

from .outputs import Detokenized, Tokenized, json_response
from .schemas import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import OpenAIServing


def _tokenize(s: OpenAIServing, req: TokenizeRequest) -> list[int]:
    if req.messages is None:
        return s.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens is not False)["input_ids"]
    chat = ChatCompletionRequest(messages=req.messages, tools=req.tools, tool_choice=req.tool_choice)
    ids, _ = s.chat_prompt(chat, s.tool_plan(chat), req.add_generation_prompt, req.add_special_tokens)
    return ids


async def tokenize(s: OpenAIServing, req: TokenizeRequest) -> Response:
    s.check_model(req)
    ids = await asyncio.to_thread(_tokenize, s, req)
    body = Tokenized(count=len(ids), max_model_len=s.info.max_model_len, tokens=ids,
                     token_strs=s.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None)
    if req.return_token_bytes:
        body.token_bytes = [list(s.token_bytes(t)) for t in ids]
    return json_response(body)


async def detokenize(s: OpenAIServing, req: DetokenizeRequest) -> Response:
    s.check_model(req)
    ids = s.token_ids(req.tokens, "tokens")
    return json_response(Detokenized(prompt=await asyncio.to_thread(s.tokenizer.decode, ids)))
