"""PolyLM and BLOOMZ end to end, served from tiny copies of their published checkpoints (built and trained on the
shipped multilingual text by scripts/make_test_models.py) with the command lines of the README's Models section,
on real ports.

Each family's chat format is checked by its effect: a chat request must give exactly the completion of the prompt
the seeds write by hand, with the same prompt token count."""

import json
import re
import shlex
import shutil

from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import sentencepiece
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from server.families import POLYLM_DEMO_SAMPLING
from tests.conftest import (MULTISCRIPT_SCHEMA, ROOT, TIME_TOOL, WEATHER_TOOL, check_tool_calls, sse_events,
                            start_side_by_side, streamed_tool_calls)

GREEDY = {"temperature": 0, "num_beams": 1}
SCRIPTS = {"zh": r"[\u4e00-\u9fff]", "th": r"[\u0e00-\u0e7f]", "ar": r"[\u0600-\u06ff]"}
FIRST_SENTENCE = {"zh": "北京是中国的首都。", "th": "ปักกิ่งเป็นเมืองหลวงของประเทศจีน", "ar": "بكين هي عاصمة الصين."}
SERVED = ("polylm-1.7b", "polylm-13b", "polylm-multialpaca-13b", "polylm-chat-13b", "bloomz-560m")
CHAT = ("polylm-multialpaca-13b", "polylm-chat-13b", "bloomz-560m")  # base models complete text only
FAMILY = {"polylm-1.7b": "polylm", "polylm-13b": "polylm", "polylm-multialpaca-13b": "polylm-multialpaca",
          "polylm-chat-13b": "polylm-chat", "bloomz-560m": "bloomz"}


def readme_commands() -> dict[str, list[str]]:
    """The README's Models table: the first `python -m server --model /models/NAME ...` of each row, by NAME."""
    commands = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        for command in re.findall(r"`(python -m server --model /models/[^`]*)`", line if line.startswith("|") else ""):
            args = shlex.split(command)[3:]
            commands.setdefault(args[1].removeprefix("/models/"), args)
            break
    return commands


@pytest.fixture(scope="module")
def servers(start_server, family_models, tmp_path_factory):
    """Every fixture started as the README says, with /models/ standing for the folder the fixtures are in; and a
    BLOOMZ copy given a generation_config.json and --chat-template."""
    commands = readme_commands()
    assert set(SERVED) <= set(commands), f"README rows without a fixture check: {set(SERVED) - set(commands)}"
    root = family_models["polylm-1.7b"].parent
    servers = {name: [a.replace("/models/", f"{root}/", 1) for a in commands[name]] for name in SERVED}
    custom = tmp_path_factory.mktemp("custom") / "bloomz-560m-custom"
    shutil.copytree(family_models["bloomz-560m"], custom)
    (custom / "generation_config.json").write_text(json.dumps({"num_beams": 4, "early_stopping": True}))
    template = custom / "qa.jinja"
    template.write_text("{% for m in messages %}{{ 'Q: ' + m.content + '\\n' if m.role == 'user' else m.content + '\\n' }}"
                        "{% endfor %}{{ 'A:' }}")
    servers["custom"] = ["--model", str(custom), "--chat-template", str(template)]
    return start_side_by_side(start_server, **servers)


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


def test_models_show_family_context_and_both_dtypes(servers, validate):
    for name in SERVED:
        body = httpx.get(servers[name].url + "/v1/models").json()
        validate("ListModelsResponse", body)
        card = body["data"][0]
        stored = "float16" if name.startswith("bloomz") else "bfloat16"
        assert (card["id"], card["family"], card["max_model_len"]) == (name, FAMILY[name], 2048), card
        assert card["checkpoint_dtype"] == stored and card["dtype"] in ("float32", "bfloat16"), card
    log = servers["polylm-13b"].log_path.read_text()
    assert "loading transformers' own GPT2LMHeadModel" in log and "weights stored in bfloat16" in log
    assert "LOAD REPORT" not in log and "Traceback" not in log


@pytest.mark.parametrize(
    ("server", "messages", "prompt"),
    [
        ("polylm-chat-13b", [{"role": "user", "content": "北京是中国的首都。"}],
         "<|user|>\n北京是中国的首都。\n<|assistant|>\n"),
        ("polylm-chat-13b",
         [{"role": "system", "content": "Pekin jest stolicą Chin."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "بكين هي عاصمة الصين."}],
         "<|user|>\nPekin jest stolicą Chin.\n\nHi\n<|assistant|>\nHello!</s><|user|>\nبكين هي عاصمة الصين.\n<|assistant|>\n"),
        ("polylm-multialpaca-13b", [{"role": "user", "content": "Пекин — столица Китая."}], "Пекин — столица Китая.\n\n"),
        ("polylm-multialpaca-13b",
         [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "ปักกิ่งเป็นเมืองหลวงของประเทศจีน"}],
         "Hi\n\nHello!\nปักกิ่งเป็นเมืองหลวงของประเทศจีน\n\n"),
        ("bloomz-560m", [{"role": "user", "content": "Pékin est la capitale de la Chine."}],
         "Pékin est la capitale de la Chine."),
        ("custom", [{"role": "user", "content": "Beijing is the capital of China."}],
         "Q: Beijing is the capital of China.\nA:"),
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
    # /tokenize counts what the chat route and the completion route count
    for body in ({"messages": messages}, {"prompt": prompt}):
        status, counted = post(s, "/tokenize", body)
        assert status == 200 and counted["count"] == len(counted["tokens"]) == by_chat["usage"]["prompt_tokens"], counted


def test_chat_answers_are_real_text_ending_on_token_2(servers):
    # The tiny chat model learned to answer a paragraph's first sentence with the rest of it, then </s> (id 2).
    body = chat(servers["polylm-chat-13b"], [{"role": "user", "content": "베이징은 중국의 수도입니다."}], max_tokens=100,
                **GREEDY)
    assert body["choices"][0]["message"]["content"] == "오늘은 날씨가 좋아서 많은 사람들이 공원을 산책합니다. 언어 모델은 글을 한 단어씩 이어서 씁니다."
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("server", ["polylm-1.7b", "polylm-13b"])
def test_base_polylm_refuses_chat_but_completes(servers, server, validate):
    status, body = post(servers[server], "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400
    validate("ErrorResponse", body)
    assert body["error"]["param"] == "messages"
    assert "/v1/completions" in body["error"]["message"] and "--chat-template" in body["error"]["message"]
    body = complete(servers[server], "Beijing is the capital of China.", max_tokens=40, **GREEDY)
    assert "The weather is fine today" in body["choices"][0]["text"]


@pytest.mark.parametrize("server", SERVED)
@pytest.mark.parametrize("lang", ["zh", "th", "ar"])
def test_streams_whole_characters(servers, server, lang, validate):
    """Streamed pieces are whole characters, and joined they equal the non-streamed answer."""
    s = servers[server]
    fields = {"max_tokens": 200, **GREEDY}
    if server.startswith("polylm") and server in CHAT:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": FIRST_SENTENCE[lang]}], **fields}
    else:
        path, body = "/v1/completions", {"prompt": FIRST_SENTENCE[lang], **fields}
    status, whole = post(s, path, body)
    assert status == 200
    with httpx.stream("POST", s.url + path, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        events = sse_events(r.iter_lines())
    choices = [e["choices"][0] for e in events if e["choices"]]
    if path == "/v1/chat/completions":
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
    if server.startswith("bloomz") and lang != "ar":
        # byte-level BPE splits these characters over several tokens: fewer non-empty pieces than tokens
        assert sum(1 for p in pieces if p) < tokens


BEAM_PROMPTS = {
    "polylm-1.7b": "Peking ist die Hauptstadt von China.",
    "polylm-13b": "Pechino è la capitale della Cina.",
    "polylm-multialpaca-13b": "Pekín es la capital de China.\n\n",
    "polylm-chat-13b": "<|user|>\nBeijing is the capital of China.\n<|assistant|>\n",
    "bloomz-560m": "Pekin, Çin'in başkentidir.",
}


@pytest.mark.parametrize("server", SERVED)
def test_four_beams_equal_the_seeds_generate(servers, family_models, server):
    """num_beams=4, early_stopping=True, as the PolyLM and BLOOMZ usage scripts decode, token for token against
    transformers' generate on the same folder, the prompt tokenized by SentencePiece itself for PolyLM."""
    prompt = BEAM_PROMPTS[server]
    body = complete(servers[server], prompt, max_tokens=32, num_beams=4, early_stopping=True, n=2)
    assert len(body["choices"]) == 2 and all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    assert body["choices"][0]["text"].strip(), body
    served = httpx.get(servers[server].url + "/v1/models").json()["data"][0]["dtype"]
    if served != "float32":
        pytest.skip(f"served in {served} on this CPU: its rounding depends on the batch's shape, so token equality "
                    "with generate is checked where the model is served in float32")
    path = family_models[server]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # GPT-2 for polylm-13b too
    tokenizer = TokenizersBackend.from_pretrained(path)  # what the server decodes with
    if server.startswith("polylm"):
        ids = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).encode(prompt)
    else:
        ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, num_beams=4, early_stopping=True, max_new_tokens=32, eos_token_id=2,
                             pad_token_id=2)
    # the continuation's text, spaces included, as it reads after the prompt
    expected = tokenizer.decode(out[0], skip_special_tokens=True)[len(tokenizer.decode(ids, skip_special_tokens=True)):]
    assert body["choices"][0]["text"] == expected


def test_instruction_models_sample_as_the_authors_demos_unless_asked_otherwise(servers):
    s = servers["polylm-chat-13b"]  # no generation_config.json: the family's 0.7 / 0.8 / 1.02 apply
    messages = [{"role": "user", "content": "Peking is de hoofdstad van China."}]
    fields = {"max_tokens": 16, "seed": 11, "logprobs": True, "top_logprobs": 3}

    def run(**extra):
        choice = chat(s, messages, **fields, **extra)["choices"][0]
        return choice["message"]["content"], choice["logprobs"]

    default = run()
    assert default == run(**POLYLM_DEMO_SAMPLING)
    assert default != run(temperature=1.0, top_p=1.0, repetition_penalty=1.0)  # a request's own values win
    greedy = chat(s, messages, max_tokens=16, temperature=0)["choices"][0]["message"]["content"]
    beams = chat(s, messages, max_tokens=16, num_beams=4, early_stopping=True)["choices"][0]["message"]["content"]
    assert greedy and beams  # the model cards' 4-beam search, asked for per request


def test_generation_config_supplies_defaults_and_requests_win(servers):
    s = servers["custom"]  # its generation_config.json: num_beams=4, early_stopping=True
    prompt = "Pekin jest stolicą Chin."
    default = complete(s, prompt)["choices"][0]["text"]
    assert default == complete(s, prompt, num_beams=4, early_stopping=True)["choices"][0]["text"]
    # asking for sampling drops the default beams instead of failing on the clash
    sampled = complete(s, prompt, temperature=0.9, seed=7, n=2)
    assert len(sampled["choices"]) == 2
    # streamed through the official SDK, the default beam search gives the same text
    client = OpenAI(base_url=s.url + "/v1", api_key="unused")
    stream = client.completions.create(model="bloomz-560m-custom", prompt=prompt, max_tokens=24, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == default


@pytest.mark.parametrize("server", SERVED)
def test_structured_outputs_and_tool_calls_on_each_tokenizer(servers, server, validate):
    """PolyLM's SentencePiece with byte fallback and BLOOMZ's byte-level BPE: a schema with Chinese, Thai and Arabic
    keys and values, sampled; on the chat models also forced and streamed tool calls and a tool-result turn, in
    each family's own format."""
    s = servers[server]
    fmt = {"type": "json_schema", "json_schema": {"name": "card", "schema": MULTISCRIPT_SCHEMA, "strict": True}}
    weather = [{"role": "user", "content": "What is the weather in Beijing?"}]
    jobs = [lambda: complete(s, "北京是中国的首都。", guided_json=MULTISCRIPT_SCHEMA, max_tokens=250, temperature=1.0,
                             seed=7, n=2)]
    if server in CHAT:
        jobs += [
            lambda: chat(s, [{"role": "user", "content": "ปักกิ่งเป็นเมืองหลวงของประเทศจีน"}], response_format=fmt,
                         max_tokens=250, temperature=0.9, seed=3),
            # one call: a sampled tiny model may go on adding calls until max_tokens
            lambda: chat(s, weather, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", max_tokens=200,
                         temperature=1.0, seed=1, parallel_tool_calls=False),
            lambda: stream_chat(s, weather, tools=[WEATHER_TOOL], max_tokens=200,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [f.result() for f in [pool.submit(j) for j in jobs]]
    validate("CreateCompletionResponse", results[0])
    for c in results[0]["choices"]:
        assert c["finish_reason"] == "stop", c
        jsonschema.validate(json.loads(c["text"]), MULTISCRIPT_SCHEMA)
    if server not in CHAT:
        return
    card, called, events = results[1:]
    for body in (card, called):
        validate("CreateChatCompletionResponse", body)
    jsonschema.validate(json.loads(card["choices"][0]["message"]["content"]), MULTISCRIPT_SCHEMA)
    message = called["choices"][0]["message"]
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    check_tool_calls(message["tool_calls"])
    for e in events:
        validate("CreateChatCompletionStreamResponse", e)
    streamed = streamed_tool_calls(events)
    check_tool_calls(streamed)
    assert [c["function"]["name"] for c in streamed] == ["get_weather"]
    # the result turn: the call and its answer are in the prompt, in the family's format
    turn = [*weather, {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]},
            *[{"role": "tool", "tool_call_id": c["id"], "content": "晴天 21°C"} for c in message["tool_calls"]]]
    after = chat(s, turn, tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=16, **GREEDY)
    validate("CreateChatCompletionResponse", after)
    assert after["usage"]["prompt_tokens"] > called["usage"]["prompt_tokens"]


def stream_chat(server, messages, **fields):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120,
                      json={"messages": messages, "stream": True, **fields}) as r:
        assert r.status_code == 200
        return sse_events(r.iter_lines())

