"""PolyLM and BLOOMZ end to end: tiny models of their real architectures and tokenizers (built and trained on the
shipped multilingual text by scripts/make_test_models.py), served on real ports.

Each family's chat format is checked by its effect: a chat request must give exactly the completion of the prompt
the seeds write by hand, with the same prompt token count."""

import re

import httpx
import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import sse_events

GREEDY = {"temperature": 0, "num_beams": 1}
SCRIPTS = {"zh": r"[\u4e00-\u9fff]", "th": r"[\u0e00-\u0e7f]", "ar": r"[\u0600-\u06ff]"}
FIRST_SENTENCE = {"zh": "北京是中国的首都。", "th": "ปักกิ่งเป็นเมืองหลวงของประเทศจีน", "ar": "بكين هي عاصمة الصين."}


@pytest.fixture(scope="module")
def servers(start_server, family_models, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "qa.jinja"
    template.write_text("{% for m in messages %}{{ 'Q: ' + m.content + '\\n' if m.role == 'user' else m.content + '\\n' }}"
                        "{% endfor %}{{ 'A:' }}")
    return {
        "polylm-chat": start_server("--model", str(family_models["polylm-chat"])),
        "polylm-multialpaca": start_server("--model", str(family_models["polylm-multialpaca"])),
        "polylm": start_server("--model", str(family_models["polylm-base"]), "--trust-remote-code"),
        "bloomz": start_server("--model", str(family_models["bloomz"])),
        "templated": start_server("--model", str(family_models["polylm-base"]), "--trust-remote-code",
                                  "--chat-template", str(template), "--served-model-name", "base-with-template"),
    }


def post(server, path, body):
    r = httpx.post(server.url + path, json=body, timeout=120)
    return r.status_code, r.json()


def complete(server, prompt, **fields):
    status, body = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 24, **fields})
    assert status == 200, body
    return body


def chat(server, messages, **fields):
    status, body = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 24, **fields})
    assert status == 200, body
    return body


def test_models_show_family_and_context(servers, validate):
    expected = {"polylm-chat": ("polylm-chat", 512), "polylm-multialpaca": ("polylm-multialpaca", 512),
                "polylm": ("polylm", 512), "bloomz": ("bloomz", 2048)}
    for name, (family, context) in expected.items():
        body = httpx.get(servers[name].url + "/v1/models").json()
        validate("ListModelsResponse", body)
        card = body["data"][0]
        assert (card["family"], card["max_model_len"]) == (family, context), card


@pytest.mark.parametrize(
    ("server", "messages", "prompt"),
    [
        ("polylm-chat", [{"role": "user", "content": "北京是中国的首都。"}], "<|user|>\n北京是中国的首都。\n<|assistant|>\n"),
        ("polylm-chat",
         [{"role": "system", "content": "Pekin jest stolicą Chin."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "بكين هي عاصمة الصين."}],
         "<|user|>\nPekin jest stolicą Chin.\n\nHi\n<|assistant|>\nHello!</s><|user|>\nبكين هي عاصمة الصين.\n<|assistant|>\n"),
        ("polylm-multialpaca", [{"role": "user", "content": "Пекин — столица Китая."}], "Пекин — столица Китая.\n\n"),
        ("bloomz", [{"role": "user", "content": "Pékin est la capitale de la Chine."}], "Pékin est la capitale de la Chine."),
        ("templated", [{"role": "user", "content": "Beijing is the capital of China."}], "Q: Beijing is the capital of China.\nA:"),
    ],
)
def test_chat_renders_the_family_format(servers, messages, prompt, server, validate):
    s = servers[server]
    by_chat = chat(s, messages, **GREEDY)
    by_completion = complete(s, prompt, **GREEDY)
    validate("CreateChatCompletionResponse", by_chat)
    assert by_chat["choices"][0]["message"]["content"] == by_completion["choices"][0]["text"]
    assert by_chat["usage"]["prompt_tokens"] == by_completion["usage"]["prompt_tokens"]
    assert by_chat["usage"]["completion_tokens"] == by_completion["usage"]["completion_tokens"] > 0


def test_chat_answers_are_real_text_ending_on_token_2(servers):
    # The tiny chat model learned to answer a paragraph's first sentence with the rest of it, then </s> (id 2).
    body = chat(servers["polylm-chat"], [{"role": "user", "content": "베이징은 중국의 수도입니다."}], max_tokens=100, **GREEDY)
    assert body["choices"][0]["message"]["content"] == "오늘은 날씨가 좋아서 많은 사람들이 공원을 산책합니다. 언어 모델은 글을 한 단어씩 이어서 씁니다."
    assert body["choices"][0]["finish_reason"] == "stop"


def test_base_polylm_refuses_chat_but_completes(servers, validate):
    status, body = post(servers["polylm"], "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400
    validate("ErrorResponse", body)
    assert body["error"]["param"] == "messages"
    assert "/v1/completions" in body["error"]["message"] and "--chat-template" in body["error"]["message"]
    seed = "Beijing is the capital of China."
    body = complete(servers["polylm"], seed, max_tokens=40, **GREEDY)
    assert "The weather is fine today" in body["choices"][0]["text"]


@pytest.mark.parametrize("server", ["polylm-chat", "bloomz"])
@pytest.mark.parametrize("lang", ["zh", "th", "ar"])
def test_streams_whole_characters(servers, server, lang, validate):
    """Streamed pieces are whole characters, and joined they equal the non-streamed answer."""
    s = servers[server]
    fields = {"max_tokens": 200, **GREEDY}
    if server == "polylm-chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": FIRST_SENTENCE[lang]}], **fields}
    else:
        path, body = "/v1/completions", {"prompt": FIRST_SENTENCE[lang], **fields}
    status, whole = post(s, path, body)
    assert status == 200
    with httpx.stream("POST", s.url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        events = sse_events(r.iter_lines())
    choices = [e["choices"][0] for e in events if e["choices"]]
    if server == "polylm-chat":
        for e in events:
            validate("CreateChatCompletionStreamResponse", e)
        pieces = [c["delta"].get("content") or "" for c in choices]
        text = whole["choices"][0]["message"]["content"]
    else:
        pieces = [c["text"] for c in choices]
        text = whole["choices"][0]["text"]
    assert "".join(pieces) == text
    assert re.search(SCRIPTS[lang], text), text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert choices[-1]["finish_reason"] == whole["choices"][0]["finish_reason"] == "stop"
    tokens = events[-1]["usage"]["completion_tokens"]
    if server == "bloomz" and lang != "ar":
        # byte-level BPE splits these characters over several tokens: fewer non-empty pieces than tokens
        assert sum(1 for p in pieces if p) < tokens


@pytest.fixture(scope="module")
def hf_models(family_models):
    out = {}
    for name, key in (("polylm-chat", "polylm-chat"), ("polylm", "polylm-base"), ("bloomz", "bloomz")):
        path = family_models[key]
        out[name] = (AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval(),
                     AutoTokenizer.from_pretrained(path, legacy=False, use_fast=False))
    return out


@pytest.mark.parametrize(("server", "prompt"), [
    ("polylm-chat", "<|user|>\nBeijing is the capital of China.\n<|assistant|>\n"),
    ("polylm", "Peking ist die Hauptstadt von China."),
    ("bloomz", "Pekin, Çin'in başkentidir."),
])
def test_four_beams_equal_the_seeds_generate(servers, hf_models, server, prompt):
    """num_beams=4, early_stopping=True, as the PolyLM and BLOOMZ usage scripts decode, token for token."""
    model, tok = hf_models[server]
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, num_beams=4, early_stopping=True, max_new_tokens=32, eos_token_id=2)
    # the continuation's text, spaces included, as it reads after the prompt
    expected = tok.decode(out[0], skip_special_tokens=True)[len(tok.decode(ids.input_ids[0], skip_special_tokens=True)):]
    body = complete(servers[server], prompt, max_tokens=32, num_beams=4, early_stopping=True, n=2)
    assert body["choices"][0]["text"] == expected
    assert len(body["choices"]) == 2


def test_generation_config_supplies_defaults_and_requests_win(servers):
    s = servers["polylm-chat"]  # its generation_config.json: num_beams=4, early_stopping=True
    messages = [{"role": "user", "content": "Peking is de hoofdstad van China."}]
    default = chat(s, messages)["choices"][0]["message"]["content"]
    assert default == chat(s, messages, num_beams=4, early_stopping=True)["choices"][0]["message"]["content"]
    greedy = chat(s, messages, num_beams=1)["choices"][0]["message"]["content"]
    # the same prompt, greedy by temperature 0 with the default beams switched off: one search, one answer
    plain = complete(s, "<|user|>\nPeking is de hoofdstad van China.\n<|assistant|>\n", max_tokens=24, num_beams=1,
                     temperature=0)
    assert greedy == plain["choices"][0]["text"]
    # asking for sampling drops the default beams instead of failing on the clash
    sampled = chat(s, messages, temperature=0.9, seed=7, n=2)
    assert len(sampled["choices"]) == 2
    # streamed through the official SDK, the default beam search gives the same text
    client = OpenAI(base_url=s.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="polylm-chat", messages=messages, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == default
