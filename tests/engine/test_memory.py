"""KV memory on a GPU, checked here: the budget arithmetic, the buffers' caps, the dry step and the figures /metrics
shows, with torch.cuda's memory queries answered by a stand-in device (this machine has none)."""

import dataclasses

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from server.engine import build as build_module
from server.api.metrics import Metrics
from server.config import Settings
from server.engine import memory
from server.engine.client import EngineConfig
from server.engine.kvcache import InPlaceLayer, footprint
from server.engine.loader import Loaded, ModelLoadError, kv_bytes_per_token
from server.engine.runner import ModelRunner
from server.families import FAMILIES

GiB = 2**30


@pytest.mark.parametrize("capacity, rows, cols", [(50_000, 8, 512), (300_000, 64, 2048), (9_000, 4, 2048),
                                                  (10**9, 16, 256)])
def test_the_token_budget_is_the_largest_whose_buffers_fit(capacity, rows, cols):
    budget = memory.token_budget(capacity, rows, cols)
    assert cols <= budget <= rows * cols

    def worst(t):
        return max(footprint(r, min(cols, t // r), rows, cols) for r in range(1, min(rows, t) + 1))

    assert worst(budget) <= capacity  # every batch admitted under it fits, spare rows and columns included
    assert budget == rows * cols or worst(budget + 1) > capacity  # and one token more would not


def test_no_budget_when_one_full_row_and_its_spare_do_not_fit():
    assert memory.token_budget(footprint(1, 2048, 64, 2048) - 1, 64, 2048) == 0
    assert memory.token_budget(footprint(1, 2048, 64, 2048), 64, 2048) >= 2048


def _kv(rows, width):
    return torch.zeros(rows, 2, width, 4), torch.zeros(rows, 2, width, 4)


def test_buffers_never_grow_past_the_longest_row_or_the_most_rows():
    layer = InPlaceLayer(columns=0, max_rows=6, max_cols=40)
    layer.update(*_kv(2, 30))  # the spare would make 62 columns
    assert layer.kbuf.shape[2] == 40
    for _ in range(10):  # decode steps up to the longest row
        layer.update(*_kv(2, 1))
    assert layer.kbuf.shape[2] == 40 and layer.width == 40
    other = InPlaceLayer(max_rows=6, max_cols=40)
    other.update(*_kv(4, 40))
    layer.append_rows(other, 40)  # 6 rows: the spare would make 10 slots
    assert layer.kbuf.shape[:3] == (6, 2, 40) and layer.rows == 6
    assert layer.keys.shape == (6, 2, 40, 4)


class FakeDevice:
    """What torch.cuda's memory queries answer for a device of `total` bytes; the dry step runs on the CPU."""

    def __init__(self, total, other, weights, activations=0):
        self.total, self.other, self.weights, self.activations = total, other, weights, activations
        self.peak = weights
        self.seen = {}

    def install(self, monkeypatch):
        real_dry_step = memory.dry_step

        def dry_step(runner, rows, tokens):  # the real step, on the CPU; the device's peak grows as a GPU's would
            kv = real_dry_step(runner, rows, tokens)
            self.seen.update(rows=rows, tokens=tokens, kv=kv)
            self.peak += self.activations + kv
            return kv

        monkeypatch.setattr(memory, "dry_step", dry_step)
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda d=None: setattr(self, "peak", self.weights))
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(cuda, "memory_reserved", lambda d=None: self.weights + GiB)
        monkeypatch.setattr(cuda, "memory_allocated", lambda d=None: self.weights)
        monkeypatch.setattr(cuda, "mem_get_info", lambda d=None: (self.total - self.other - self.weights - GiB,
                                                                   self.total))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir, tokenizer):
    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()


def test_the_dry_step_runs_the_largest_batch_and_the_budget_is_what_it_leaves(gpt2, tokenizer, monkeypatch):
    device = FakeDevice(total=80 * GiB, other=2 * GiB, weights=20 * GiB, activations=3 * GiB)
    device.install(monkeypatch)
    seen = device.seen
    runner = ModelRunner(gpt2, torch.device("cpu"), len(tokenizer), 16, 256)
    per_token = kv_bytes_per_token(gpt2.config, torch.float32)
    b = memory.size_from_device(runner, torch.device("cpu"), 0.9, per_token, 16, 256, prompt_tokens=64)
    assert seen["rows"] == 16 and seen["tokens"] == 64 and seen["kv"] > 0
    assert b.peak == 23 * GiB and b.other == 2 * GiB
    assert b.kv_bytes == int(80 * GiB * 0.9) - 2 * GiB - 23 * GiB
    assert b.tokens == memory.token_budget(b.kv_bytes // per_token, 16, 256) == 16 * 256  # a tiny model: all fit


def _loaded(model, tokenizer):
    return Loaded(model=model, tokenizer=tokenizer, name="t", device=torch.device("cpu"), family=FAMILIES["hf"],
                  dtype=torch.float32, checkpoint_dtype="float32", generation_defaults={})


def test_start_up_sizes_the_kv_cache_from_the_device_and_refuses_one_too_small(gpt2, tokenizer, monkeypatch):
    per_token = kv_bytes_per_token(gpt2.config, torch.float32)  # 2 layers x 64 x 2 x 4 bytes
    monkeypatch.setattr(build_module, "cuda_devices", lambda model: [torch.device("cuda:0")])
    device = FakeDevice(total=10 * GiB, other=0, weights=0)
    device.install(monkeypatch)
    settings = Settings(max_batch_size=8, gpu_memory_utilization=0.9, prefill_chunk=16, prefix_cache=False)
    # room for only 3,000 tokens of KV under the utilization: less than the budget 8 x 256 rows would want
    device.weights = int(10 * GiB * 0.9) - 3000 * per_token
    budget, prefix = build_module.kv_budget(settings, _loaded(gpt2, tokenizer), 256)
    assert budget == memory.token_budget(3000, 8, 256) and 256 <= budget < 8 * 256 and prefix == 0
    assert build_module.kv_budget(dataclasses.replace(settings, max_batch_tokens=300), _loaded(gpt2, tokenizer),
                                  256)[0] == 300  # an explicit budget still lowers it
    # the prefix cache's default share (1/8) comes out of the same bytes; an explicit size replaces it
    budget, prefix = build_module.kv_budget(dataclasses.replace(settings, prefix_cache=True), _loaded(gpt2, tokenizer),
                                            256)
    assert prefix == 3000 * per_token // 8 and budget == memory.token_budget((3000 * per_token - prefix) // per_token,
                                                                             8, 256)
    assert build_module.kv_budget(dataclasses.replace(settings, prefix_cache=True, prefix_cache_memory="64KiB"),
                                  _loaded(gpt2, tokenizer), 256)[1] == 65536
    device.weights = int(10 * GiB * 0.9) - 100 * per_token
    with pytest.raises(ModelLoadError, match="less than one full-length row of 256 tokens"):
        build_module.kv_budget(settings, _loaded(gpt2, tokenizer), 256)
    with pytest.raises(ModelLoadError, match="--gpu-memory-utilization must be in"):
        build_module.kv_budget(dataclasses.replace(settings, gpu_memory_utilization=1.5), _loaded(gpt2, tokenizer), 256)


def test_cpu_budget_stays_the_flag(gpt2, tokenizer):
    per_token = kv_bytes_per_token(gpt2.config, torch.float32)
    assert build_module.kv_budget(Settings(), _loaded(gpt2, tokenizer), 256) == (131072, 131072 * per_token // 8)
    assert build_module.kv_budget(Settings(max_batch_tokens=5000), _loaded(gpt2, tokenizer), 256)[0] == 5000
    assert build_module.kv_budget(Settings(max_batch_tokens=10**8), _loaded(gpt2, tokenizer), 256)[1] == 2**30
    assert build_module.kv_budget(Settings(prefix_cache=False), _loaded(gpt2, tokenizer), 256)[1] == 0


def test_metrics_show_device_memory(monkeypatch):
    FakeDevice(total=80 * GiB, other=0, weights=20 * GiB).install(monkeypatch)

    class Idle:
        num_running = num_waiting = 0
        config = EngineConfig(max_model_len=2048)

        def cache_usage(self):
            return 0, 0, 0

        def prefix_cache_stats(self):
            return None

    text = Metrics(Idle(), [torch.device("cuda:0")]).render().decode()
    samples = {(s.name, s.labels.get("device")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("polyglot_device_memory_reserved_bytes", "cuda:0")] == 21 * GiB
    assert samples[("polyglot_device_memory_used_bytes", "cuda:0")] == 20 * GiB
    assert samples[("polyglot_device_memory_total_bytes", "cuda:0")] == 80 * GiB
    assert "polyglot_device_memory" not in Metrics(Idle()).render().decode()  # CPU: no device figures


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_bloom_dir", "tiny_llama_dir"])
def test_prompt_logprobs_are_made_a_slice_of_positions_at_a_time(fixture, request, tokenizer, monkeypatch):
    """Echo with a long prompt: the logits of at most PROMPT_SLICE positions exist at once (not the whole
    prompt's, 2.1 GB a row for a 2,048-token PolyLM prompt), and the figures equal one full forward's."""
    from server.engine import runner as runner_module
    from server.engine.params import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32).eval()
    monkeypatch.setattr(runner_module, "PROMPT_SLICE", 7)
    runner = ModelRunner(model, torch.device("cpu"), len(tokenizer))
    assert runner.trunk is not None
    head_rows = []
    head = runner._head
    monkeypatch.setattr(runner, "_head", lambda h: head_rows.append(h.shape[-2] if h.dim() > 1 else 1) or head(h))
    prompts = [list(range(5, 35)), list(range(40, 52))]  # 30 and 12 tokens: slices of 7, the last one shorter
    reqs = runner_module.bare_requests(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3))
    _, last = runner.prefill(reqs)
    assert max(head_rows) <= 7
    for r, ids in zip(reqs, prompts, strict=True):
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, :, : len(tokenizer)].float().log_softmax(-1)
        got = r.prompt_logprobs
        assert len(got) == len(ids) and got[0].logprob is None
        for j, lp in enumerate(got[1:]):
            assert lp.token_id == ids[j + 1]
            assert lp.logprob == pytest.approx(float(want[j, ids[j + 1]]), abs=1e-4)
            assert [t for t, _ in lp.top] == want[j].topk(3).indices.tolist()
    with torch.no_grad():
        final = model(torch.tensor([prompts[0]])).logits[0, -1, : len(tokenizer)]
    assert torch.allclose(last[0], final, atol=1e-4)
