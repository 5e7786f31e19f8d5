"""Architectures other than Llama behind the HTTP API: BLOOM (ALiBi, no position ids, no context limit in
its config) and GPT-2 (learned absolute positions)."""

import openai
import pytest

from tests.conftest import start_side_by_side


@pytest.fixture(scope="module")
def servers(start_server, tiny_bloom_dir, tiny_gpt2_dir):
    return start_side_by_side(start_server, tiny_bloom_dir=("--model", str(tiny_bloom_dir), "--served-model-name", "m"),
                              tiny_gpt2_dir=("--model", str(tiny_gpt2_dir), "--served-model-name", "m"))


@pytest.mark.parametrize("fixture", ["tiny_bloom_dir", "tiny_gpt2_dir"])
def test_serves_batched_streams(servers, fixture):
    server = servers[fixture]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    card = client.models.list().data[0].model_dump()
    assert card["max_model_len"] == (2048 if fixture == "tiny_bloom_dir" else 256)
    prompts = ["Hello", "A longer prompt with several more words in it", "北京"]
    full = client.completions.create(model="m", prompt=prompts, max_tokens=12, temperature=0)
    for i, p in enumerate(prompts):
        alone = client.completions.create(model="m", prompt=p, max_tokens=12, temperature=0).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(model="m", prompt=p, max_tokens=12,
                                                                                 temperature=0, stream=True))
        assert full.choices[i].text == alone == streamed
    beams = client.completions.create(model="m", prompt=prompts[0], max_tokens=8, extra_body={"num_beams": 4})
    assert beams.choices[0].finish_reason in ("stop", "length")
