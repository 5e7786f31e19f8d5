"""The decode step written out for Llama-shaped models (llama.py) against transformers' forward, on tiny real models
that the tests build: the same logits through rows joining, leaving and padding, on 16/32-bit and 4-bit weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from server.engine import attention, llama
from server.engine.params import SamplingParams
from server.engine.quant import Int4Linear, quantize_int4
from server.engine.runner import ModelRunner, bare_requests

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SIZES),
    "llama-head-dim": lambda: LlamaConfig(**{**SIZES, "head_dim": 32, "attention_bias": True, "mlp_bias": True}),
    "llama-64": lambda: LlamaConfig(**{**SIZES, "hidden_size": 128, "intermediate_size": 192, "num_attention_heads": 2,
                                       "num_key_value_heads": 1}),
    "mistral": lambda: MistralConfig(**SIZES, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**SIZES),  # q, k and v with biases
}


def tiny(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval().to(dtype)
    with torch.no_grad():  # biases are zeros at init: make them count
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


def steps(runner: ModelRunner, native, tokens=None) -> list[torch.Tensor]:
    """Prefill two prompts, decode, let a third row join, decode, let the first leave, decode; every step's
    logits. With `tokens` (another run's logits), each step feeds the same tokens as that run."""
    runner.native = native
    params = SamplingParams(max_tokens=16, temperature=0.0)
    batch, logits = runner.prefill(bare_requests(([5, 6, 7, 8, 9, 10, 11], [12, 13, 14]), params))
    found = [logits]
    for i in range(9):
        if i == 3:
            other, first = runner.prefill(bare_requests(([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],), params))
            batch.extend(other)
            found[-1] = torch.cat([found[-1], first])
        if i == 6:
            batch.drop([0])
            found[-1] = found[-1][1:]
        batch.next_tokens = (tokens[len(found) - 1] if tokens else found[-1]).argmax(-1)
        found.append(runner.decode(batch))
    runner.native = None
    return found


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("call_pairs", [attention.CALL_PAIRS, 0])
def test_the_written_out_step_gives_transformers_logits(monkeypatch, name, call_pairs):
    monkeypatch.setattr(attention, "CALL_PAIRS", call_pairs)  # 0: rows of other lengths attend apart (attention.py)
    model = tiny(name)
    runner = ModelRunner(model, torch.device("cpu"), vocab_size=300)
    assert llama.unsupported(model) is None
    expected = steps(runner, None)
    step = llama.LlamaStep(model, 300)
    got = steps(runner, step, expected)
    assert [g.shape for g in got] == [e.shape for e in expected] == [(2, 300)] * 3 + [(3, 300)] * 3 + [(2, 300)] * 4
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # and transformers' forward, which prefill still runs, reads the joined weights: the same logits as before
    again = steps(runner, None, expected)
    for g, e in zip(again, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert runner.enable_native() is None and runner.native is not None


def test_joined_weights_are_shared_not_copied():
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    before = sum(p.numel() for p in model.parameters())
    step = llama.LlamaStep(model, 300)
    joined = step.layers[0][1].keywords["weight"]
    assert joined.shape == (64 + 2 * 32, 64)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before


@pytest.mark.parametrize("name,joins", [("llama", False), ("llama-64", True)])
@pytest.mark.parametrize("dense_from", [0, 2])
def test_on_4_bit_weights(name, joins, dense_from):
    """Packed int4 layers joined (q, k, v; gate, up: outputs of whole 64-row blocks) or side by side (not: the
    packed layout does not join by rows there) give the same logits as transformers' forward; with dense_from 2
    the two-row steps take the bf16 copies and the one-row ones the packed kernel."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this PyTorch has no packed int4 kernel for CPUs")
    model = tiny(name)
    quantize_int4(model, dense_from)
    attn = model.model.layers[0].self_attn
    assert (Int4Linear.joined([attn.q_proj, attn.k_proj, attn.v_proj]) is not None) is joins
    model.to(torch.bfloat16)
    runner = ModelRunner(model, torch.device("cpu"), vocab_size=300)
    expected = steps(runner, None)
    got = steps(runner, llama.LlamaStep(model, 300), expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0.02, atol=0.02 * float(e.abs().max()))
        assert torch.equal(g.argmax(-1), e.argmax(-1))


def test_models_of_other_shapes_keep_transformers_forward():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4))
    assert "gpt2" in llama.unsupported(gpt2)
    assert ModelRunner(gpt2, torch.device("cpu")).enable_native() is not None
    windowed = AutoModelForCausalLM.from_config(MistralConfig(**SIZES, sliding_window=16))
    assert llama.unsupported(windowed) == "sliding-window attention"
    gelu = AutoModelForCausalLM.from_config(LlamaConfig(**SIZES, hidden_act="gelu"))
    assert llama.unsupported(gelu) == "activation 'gelu'"


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_several_tokens_a_row_as_a_draft_check_feeds_them(name):
    """Prompt lookup's check (runner.verify) feeds each row its token and a draft: the step's logits at every
    position match transformers' forward of the same tokens, padded rows and a masked column included."""
    model = tiny(name)
    runner = ModelRunner(model, torch.device("cpu"), vocab_size=300)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    ids = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    found = []
    for native in (None, llama.LlamaStep(model, 300)):
        batch, _ = runner.prefill(bare_requests(([5, 6, 7, 8, 9, 10, 11], [12, 13, 14]), params))
        batch.attention_mask[1, -1] = 0  # a column the second row did not keep (a rejected draft's)
        batch.open_column(4)
        positions = batch.positions.unsqueeze(1) + torch.arange(4)
        with torch.inference_mode():
            found.append(native(ids, positions, batch.attention_mask, batch.cache) if native is not None else
                         runner._forward(ids, batch.attention_mask, positions, batch.cache, all_logits=True))
    assert found[0].shape == found[1].shape == (2, 4, 300)
    torch.testing.assert_close(found[1], found[0], rtol=1e-4, atol=1e-4)
