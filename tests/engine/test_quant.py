"""--quantization int4 (quant.py): 4-bit weights in groups of 32 through PyTorch's packed int4 kernel for CPUs. The
packing against a dequantized reference, the embedded default model's Q4_1 values kept exactly, and tiny Llama,
GPT-2 (Conv1D layers) and BLOOM networks served through the engine with it."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.config import Settings
from server.engine.engine import Engine, EngineConfig
from server.engine.loader import ModelLoadError, check_int4, default_gguf, four_bit_gguf
from server.engine.params import SamplingParams
from server.engine.quant import GROUP, Int4Linear, quantize_int4


def grid(weight: torch.Tensor) -> torch.Tensor:
    """The weights rounded as the packing rounds them: 16 levels from each group's minimum to its maximum."""
    groups = weight.float().unflatten(1, (-1, GROUP))
    low, high = groups.amin(2, keepdim=True), groups.amax(2, keepdim=True)
    scale = (high - low) / 15
    return (((groups - low) / scale).round() * scale + low).flatten(1)


def test_packed_weights_multiply_as_the_rounded_weights_do():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True).to(torch.bfloat16).requires_grad_(False)
    q = Int4Linear(linear)
    x = torch.randn(5, 3, 128, dtype=torch.bfloat16)
    want = x.float() @ grid(linear.weight).T + linear.bias.float()
    got = q(x)
    assert got.shape == (5, 3, 96) and got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.02 * want.abs().max()
    groups = linear.weight.float().unflatten(1, (-1, GROUP))
    assert 0 < q.error <= float((groups.amax(2) - groups.amin(2)).max()) / 30 + 1e-6  # half a level at most
    on_grid = torch.nn.Linear(128, 96, bias=False)
    on_grid.weight.data = grid(linear.weight)  # weights that are 4-bit already come back exactly
    assert Int4Linear(on_grid).error == 0.0


def test_a_layer_with_bf16_weights_beside_uses_them_from_its_row_count():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    q = Int4Linear(linear, dense_from=8)
    few, many = torch.randn(7, 64, dtype=torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16)
    assert torch.equal(q(many), torch.nn.functional.linear(many, linear.weight))
    packed = Int4Linear(linear)
    assert packed.dense is None and torch.equal(q(few), packed(few))
    assert not torch.equal(q(few), torch.nn.functional.linear(few, linear.weight))


def test_the_default_models_q4_1_weights_are_kept_exactly(default_model_dir):
    """The GGUF's Q4_1 blocks, dequantized by transformers, repack without a rounding: every group's q, d and m."""
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    assert four_bit_gguf(default_gguf())
    errors = quantize_int4(model)
    assert len(errors) == 30 * 7 and max(errors.values()) == 0.0
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert not isinstance(model.get_output_embeddings(), Int4Linear)


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_gpt2_dir", "tiny_bloom_dir"])
def model(request):
    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(request.param), dtype=torch.float32).eval()


def test_int4_networks_serve_through_the_engine_close_to_their_rounded_weights(model, tokenizer):
    """Every linear layer of the decoder packed (GPT-2's Conv1D included); its logits next to the same network with
    the rounded weights in fp32; and greedy requests, alone and batched, run to their length."""
    ids = tokenizer("Beijing is the capital of China. 北京是")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32).eval()
    errors = quantize_int4(model)
    model.to(torch.bfloat16)
    left = [n for n, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Conv1D") and m is not model.get_output_embeddings()]
    assert errors and not left
    for name, module in reference.named_modules():
        if name in errors:
            w = module.weight if isinstance(module, torch.nn.Linear) else module.weight.data.t()
            rounded = grid(w)
            module.weight.data = rounded if isinstance(module, torch.nn.Linear) else rounded.t().contiguous()
    with torch.inference_mode():
        got = model(torch.tensor([ids])).logits[0].float()
        want = reference(torch.tensor([ids])).logits[0]
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.99
    engine = Engine(model, tokenizer, torch.device("cpu"), EngineConfig(max_model_len=200, max_batch_size=8))
    engine.start()

    async def run(rid):
        n = 0
        async for out in engine.generate(ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), rid):
            assert out.error is None
            n += len(out.outputs[0].token_ids)
        return n

    async def scenario():
        return [await run("alone")] + await asyncio.gather(*[run(f"b{i}") for i in range(3)])

    try:
        assert asyncio.run(scenario()) == [8, 8, 8, 8]
    finally:
        engine.stop()


def test_int4_is_refused_where_its_kernel_does_not_run():
    with pytest.raises(ModelLoadError, match="drop --device-map"):
        check_int4(Settings(quantization="int4", device_map="auto"), torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="runs on CPU"):
        check_int4(Settings(quantization="int4"), torch.device("cuda"))


def test_auto_keeps_a_4_bit_gguf_4_bit_only_where_the_probe_chose_it(monkeypatch):
    from server.engine import loader
    from server.engine.cpu import Choice

    cpu = torch.device("cpu")
    for probe_says in (True, False):
        monkeypatch.setattr(loader, "cpu_choice", lambda p=probe_says: Choice("bfloat16", {}, "", int4=p))
        assert loader.auto_int4(Settings(), cpu, gguf=True) is probe_says  # the embedded default: Q4_1
    assert not loader.auto_int4(Settings(dtype="float32"), cpu, gguf=True)  # a dtype asked for is kept
    assert not loader.auto_int4(Settings(), cpu, gguf=False)  # a checkpoint folder: int4 only when asked for
