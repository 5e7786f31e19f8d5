"""Grammar masks on every tokenizer we serve: the default model's byte-level BPE, PolyLM's SentencePiece with byte
fallback and BLOOMZ's byte-level BPE (their test copies). A hand-written answer in Chinese, Thai and Arabic goes
through token by token, each token allowed by the mask before it; and what the grammar forces is tokenized as a
continuation (a SentencePiece tokenizer must not put its start-of-text "▁" in front of a forced quote)."""

import json

import pytest
import torch

from server.engine.decoding import DecodePipeline
from server.engine.grammar import GrammarCompiler
from server.engine.params import InvalidRequest, SamplingParams
from server.engine.request import Request, Sequence
from tests.conftest import MULTISCRIPT_SCHEMA

ANSWER = {"城市": "北京", "ชื่อ": "สมชาย 王 محمد", "العدد": 42, "tags": ["中文", "ภาษาไทย", "العربية"]}


@pytest.fixture(scope="module", params=["default", "polylm-1.7b", "bloomz-560m"])
def tokenizer_of(request, tokenizer, family_models):
    if request.param == "default":
        return tokenizer
    from server.engine.loader import _tokenizer
    from server.families import FAMILIES

    family = FAMILIES["polylm" if request.param.startswith("polylm") else "bloomz"]
    return _tokenizer(family_models[request.param], family, False)


def row(grammar, prompt=(1,)):
    r = Request("r", list(prompt), SamplingParams(max_tokens=200, grammar=grammar), emit=lambda _: None)
    return Sequence(r, 0, detok=None, pipeline=DecodePipeline(r.params, {2}))


def allowed(seq, vocab):
    logits = torch.zeros(vocab)
    seq.pipeline.apply(logits, seq)
    return set(torch.isfinite(logits).nonzero().squeeze(1).tolist())


def test_a_multiscript_answer_passes_the_mask_token_by_token(tokenizer_of):
    vocab = len(tokenizer_of)
    compiler = GrammarCompiler(tokenizer_of, {tokenizer_of.eos_token_id or 2}, vocab)
    seq = row(compiler.compile("json_schema", MULTISCRIPT_SCHEMA, "response_format", strict=True))
    text = json.dumps(ANSWER, ensure_ascii=False, separators=(",", ":"))
    ids = compiler.tokenizer.tokenize_str(text)
    assert tokenizer_of.decode(ids) == text
    for token in ids:
        assert token in allowed(seq, vocab), (token, tokenizer_of.decode([token]))
        seq.token_ids.append(token)
        done = seq.pipeline.grammar.accept(seq, token)
    assert done or seq.pipeline.complete()


def test_a_full_string_allows_only_its_closing_quote(tokenizer_of):
    vocab = len(tokenizer_of)
    compiler = GrammarCompiler(tokenizer_of, {2}, vocab)
    seq = row(compiler.compile("json_schema", {"type": "string", "maxLength": 3}, "response_format"))
    for token in compiler.tokenizer.tokenize_str('"   '):
        seq.pipeline.grammar.accept(seq, token)
    assert [tokenizer_of.decode([t]) for t in allowed(seq, vocab)] == ['"']


def test_compile_errors_name_the_field_and_results_are_cached(tokenizer):
    compiler = GrammarCompiler(tokenizer, {2}, len(tokenizer))
    with pytest.raises(InvalidRequest) as e:
        compiler.compile("json_schema", {"type": "string", "format": "weird"}, "response_format", strict=True)
    assert e.value.param == "response_format" and "Unknown format" in str(e.value) and "strict false" in str(e.value)
    lenient = compiler.compile("json_schema", {"type": "string", "format": "weird"}, "response_format", strict=False)
    assert lenient is compiler.compile("json_schema", {"format": "weird", "type": "string"}, "response_format", strict=False)
    with pytest.raises(InvalidRequest, match="guided_regex"):
        compiler.compile("regex", "[a-", "guided_regex")
