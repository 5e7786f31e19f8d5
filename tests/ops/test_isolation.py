"""One request's failure (NaN logits) ends that request with an error; the batch and the server go on."""

import asyncio

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

POISON = 1000  # the poisoned model's embedding of this token is NaN


@pytest.fixture(scope="module")
def poisoned_dir(tiny_llama_dir, tokenizer, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[POISON] = float("nan")
    out = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_nan_logits_fail_one_request_and_leave_the_others(start_server, poisoned_dir):
    server = start_server("--model", str(poisoned_dir), "--served-model-name", "tiny", "--dtype", "float32")
    good = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    bad = {**good, "prompt": [5, POISON, 7]}

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            streamed = c.post("/v1/completions", json={**good, "stream": True, "max_tokens": 60})
            return await asyncio.gather(c.post("/v1/completions", json=good), c.post("/v1/completions", json=bad),
                                        streamed, c.post("/v1/completions", json={**bad, "stream": True}))

    alone = httpx.post(server.url + "/v1/completions", json=good, timeout=60).json()["choices"][0]["text"]
    ok, failed, stream, failed_stream = asyncio.run(together())
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == alone
    assert stream.status_code == 200 and '"finish_reason":"length"' in stream.text
    assert failed.status_code == 500 and "NaN" in failed.json()["error"]["message"]
    assert '"error"' in failed_stream.text and "NaN" in failed_stream.text and failed_stream.text.endswith("data: [DONE]\n\n")
    # the engine is still up and its cache clean: the same request still gives the same answer
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    again = httpx.post(server.url + "/v1/completions", json=good, timeout=60).json()["choices"][0]["text"]
    assert again == alone
