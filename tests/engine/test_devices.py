"""The engine's tensor parts on devices this machine does not have, two ways. Under FakeTensorMode, tensors on
`cuda:0` and `cuda:1` carry shapes and devices but no data, and any op that mixes devices raises, as CUDA would (a
CPU-only torch refuses Python indexing of fake CUDA tensors, so the code under test uses narrow/index_select).
With virtual devices (virtual_devices.py) the tensors keep their data on the CPU and say `cuda:N`, so code that
reads values (sampling, processors, a batch's row moves, beam steps) runs whole, must give the CPU's results, and
raises on any device mix."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from server.engine.batch import Batch
from server.engine.beam import BeamGroup
from server.engine.kvcache import InPlaceLayer, KVCache
from server.engine.params import SamplingParams
from server.engine.decoding import DecodePipeline, apply_processors
from server.engine.request import Request, Sequence
from server.engine.sampling import sample, token_logprobs
from tests.engine.virtual_devices import DeviceMismatch, VirtualCuda, host


def test_beam_candidates_are_found_on_the_device_and_come_back_in_one_host_copy():
    with FakeTensorMode():
        group = BeamGroup(4, 20, 1, 1.0, True, lambda _: False)  # its scores live on the host
        logits = torch.randn(4, 1000, device="cuda:0")
        scores, index = group.top_candidates(logits)
        assert scores.device.type == "cpu" and index.device.type == "cpu"
        assert scores.shape == (8,) and index.dtype == torch.long


def test_beam_candidates_match_a_plain_topk_on_the_host():
    torch.manual_seed(0)
    group = BeamGroup(3, 20, 1, 1.0, True, lambda _: False)
    group.scores = torch.tensor([0.0, -1.5, -3.0])
    logits = torch.randn(3, 50)
    scores, index = group.top_candidates(logits)
    want = (logits.log_softmax(-1) + group.scores[:, None]).reshape(-1).topk(6)
    assert torch.equal(index, want.indices) and torch.allclose(scores, want.values)


def _layer(device: str, rows: int = 3, width: int = 5) -> InPlaceLayer:
    layer = InPlaceLayer()
    layer.lazy_initialization(torch.zeros(rows, 2, width, 4, device=device), torch.zeros(rows, 2, width, 4, device=device))
    layer.start, layer.end = 0, width
    layer._view()
    return layer


@pytest.mark.parametrize("devices", [("cuda:0", "cuda:0"), ("cuda:0", "cuda:1")])
def test_cache_rows_move_on_every_layer_s_own_device(devices):
    """--device-map over two GPUs: layer 0 on cuda:0, layer 1 on cuda:1, the batch's own tensors on cuda:0. A row
    that leaves (or a beam reorder, or n > 1) moves cache rows in both."""
    with FakeTensorMode():
        cache = KVCache()
        cache.layers = [_layer(devices[0]), _layer(devices[1])]
        mask = torch.ones(3, 5, dtype=torch.long, device="cuda:0")
        batch = Batch([None, None, None], cache, mask, torch.zeros(3, dtype=torch.long, device="cuda:0"),
                      torch.zeros(3, dtype=torch.long, device="cuda:0"))
        batch.move_cache_rows([0], [2], rows=2, trim=1)
        for layer, device in zip(cache.layers, devices, strict=True):
            assert layer.rows == 2 and layer.keys.shape == (2, 2, 4, 4) and str(layer.keys.device) == device


@pytest.mark.parametrize("capability, checkpoint, want", [
    ((7, 0), torch.bfloat16, torch.float16),  # V100: bf16 only emulated, so a bf16 PolyLM runs in fp16
    ((7, 5), None, torch.float16),  # T4
    ((8, 0), torch.bfloat16, torch.bfloat16),  # A100
    ((9, 0), None, torch.bfloat16),  # H100/H200
    ((9, 0), torch.float16, torch.float16),  # fp16 BLOOMZ stays fp16
])
def test_auto_dtype_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, checkpoint, want):
    from server.engine.loader import resolve_dtype

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    assert resolve_dtype("auto", torch.device("cuda:1"), checkpoint) == want
    assert all(d == torch.device("cuda:1") for d in asked)  # the serving device, not the current one


def test_quantization_with_device_cpu_is_refused_even_where_cuda_is_present(monkeypatch, tiny_gpt2_dir):
    from server.config import Settings
    from server.engine.loader import ModelLoadError, load

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelLoadError, match="--quantization 8bit runs on a CUDA GPU only"):
        load(Settings(model=str(tiny_gpt2_dir), device="cpu", quantization="8bit"))


def test_one_gpu_gets_the_weights_straight_from_the_files(monkeypatch, tiny_gpt2_dir, caplog):
    """device_map={"": device}: the weights go from the files to the device, not through host memory and .to().
    Checked with the `meta` device standing in for a GPU: the model must arrive there with no copy made after."""
    from server.config import Settings
    from server.engine import loader

    assert loader.placement(Settings(), torch.device("cuda:1")) == {"device_map": {"": torch.device("cuda:1")}}
    assert loader.placement(Settings(), torch.device("cpu")) == {}
    assert loader.placement(Settings(device_map="auto", max_memory="0=2GiB"), torch.device("cuda")) == {
        "device_map": "auto", "max_memory": {0: "2GiB"}}
    monkeypatch.setattr(loader, "resolve_device", lambda _: torch.device("meta"))
    monkeypatch.setattr(torch.nn.Module, "to", lambda *a, **k: pytest.fail(".to() after loading"))
    with caplog.at_level("INFO", logger="server.engine.loader"):
        loaded = loader.load(Settings(model=str(tiny_gpt2_dir), dtype="float32"))
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    assert any(" s (peak host memory " in r.getMessage() for r in caplog.records)  # load time and host peak logged


# -- with data: the same code on virtual CUDA devices (tests/engine/virtual_devices.py) gives the CPU's results --


def test_the_harness_raises_on_a_device_mix_as_cuda_would():
    with VirtualCuda():
        logits = torch.randn(4, 50, device="cuda:0")
        with pytest.raises(DeviceMismatch):
            logits.log_softmax(-1) + torch.zeros(4)[:, None]  # the beam bug: host scores on device logits
        with pytest.raises(DeviceMismatch):
            torch.cat([logits, torch.zeros(1, 50, device="cuda:1")])
        assert (logits + torch.tensor(1.0)).device == torch.device("cuda:0")  # a 0-dim host scalar is allowed


def _sampling_inputs(device):
    torch.manual_seed(3)
    logits = torch.randn(6, 3000).to(device)
    params = {"temperature": [0.0, 1.0, 0.7, 1.2, 1.0, 0.0], "top_p": [1.0, 0.9, 1.0, 0.5, 1.0, 1.0],
              "top_k": [0, 0, 40, 0, 0, 0], "min_p": [0.0, 0.0, 0.0, 0.0, 0.2, 0.0]}
    return logits, {k: torch.tensor(v, device=device) for k, v in params.items()}


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_sampling_and_logprobs_run_on_the_logits_device(device):
    logits, p = _sampling_inputs("cpu")
    torch.manual_seed(11)
    want = sample(logits, p["temperature"], p["top_p"], p["top_k"], [None] * 6, p["min_p"])
    want_lp = token_logprobs(logits, p["temperature"], want, 5)
    with VirtualCuda():
        logits, p = _sampling_inputs(device)
        torch.manual_seed(11)
        got = sample(logits, p["temperature"], p["top_p"], p["top_k"], [None] * 6, p["min_p"])
        got_lp = token_logprobs(logits, p["temperature"], got, 5)
        assert got.device == torch.device(device) and all(t.device == torch.device(device) for t in got_lp)
    assert torch.equal(host(got), want)
    assert all(torch.allclose(host(g), w) for g, w in zip(got_lp, want_lp, strict=True))


def _seqs():
    seqs = []
    for k, params in enumerate([
        SamplingParams(max_tokens=9, repetition_penalty=1.3),
        SamplingParams(max_tokens=9, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(max_tokens=9, logit_bias=((5, 3.0), (7, -100.0))),
        SamplingParams(max_tokens=9, min_tokens=4),
    ]):
        r = Request(f"p{k}", [5, 6, 7, 8], params, emit=lambda _: None)
        s = Sequence(r, 0, detok=None, pipeline=DecodePipeline(params, {2}))
        s.token_ids = [9, 9, 10]
        seqs.append(s)
    return seqs


def test_logit_processors_run_on_the_logits_device():
    torch.manual_seed(5)
    logits = torch.randn(4, 100)
    want = apply_processors(logits.clone(), _seqs())
    with VirtualCuda():
        got = apply_processors(logits.to("cuda:0"), _seqs())
        assert got.device == torch.device("cuda:0")
    assert torch.equal(host(got), want)


def _batch(devices, rows=4, width=6):
    """A batch of `rows` rows whose two cache layers sit on devices[0] and devices[1] (the batch's own tensors on
    devices[0]), with distinct values everywhere, and the ragged left padding of a real batch."""
    torch.manual_seed(7)
    cache = KVCache()
    for d in devices:
        layer = InPlaceLayer()
        layer.update(torch.randn(rows, 2, width, 4).to(d), torch.randn(rows, 2, width, 4).to(d))
        cache.layers.append(layer)
    mask = torch.ones(rows, width, dtype=torch.long)
    for i in range(rows):
        mask[i, : i] = 0  # row i has i padding columns
    mask = mask.to(devices[0])
    return Batch([f"s{i}" for i in range(rows)], cache, mask, torch.arange(rows).to(devices[0]),
                 torch.arange(rows).to(devices[0]))


def _state(batch):
    return ([host(layer.keys).clone() for layer in batch.cache.live_layers()],
            [host(layer.values).clone() for layer in batch.cache.live_layers()],
            host(batch.attention_mask).clone(), host(batch.positions).clone(), list(batch.seqs))


@pytest.mark.parametrize("devices", [("cuda:0", "cuda:0"), ("cuda:0", "cuda:1")])
def test_batch_rows_leave_repeat_and_join_across_devices(devices):
    """Batch.drop (a row leaves, the last fills its place), select (n > 1, beam reorders) and extend (a prefilled
    group joins) with each cache layer on its own device: the same cache contents as on the CPU."""

    def scenario(batch, other):
        batch.drop([1])
        batch.select([0, 0, 2, 1])
        batch.extend(other)
        return _state(batch)

    with torch.inference_mode():  # as in the engine, where every forward and move runs so
        want = scenario(_batch(("cpu", "cpu")), _batch(("cpu", "cpu"), rows=2, width=9))
        with VirtualCuda():
            got = scenario(_batch(devices), _batch(devices, rows=2, width=9))
    for g, w in zip(got[:2], want[:2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3]) and got[4] == want[4]


def test_a_beam_step_on_device_logits_equals_the_host_one():
    torch.manual_seed(2)
    steps = [torch.randn(4, 500) for _ in range(4)]

    def run(to):
        group = BeamGroup(4, 10, 1, 1.0, True, lambda c: c[-1] == 2)
        return [group.step(to(logits)) for logits in steps], group.running, group.scores

    want = run(lambda t: t)
    with VirtualCuda():
        got = run(lambda t: t.to("cuda:0"))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(host(got[2]), want[2])


def test_prompt_logprobs_slices_stay_on_the_hidden_states_device(monkeypatch):
    from server.engine import runner

    monkeypatch.setattr(runner, "PROMPT_SLICE", 4)
    torch.manual_seed(4)
    hidden, weight, ids = torch.randn(11, 8), torch.randn(30, 8), torch.randint(0, 30, (11,))

    def run(to):
        w = to(weight)
        return runner.ModelRunner._prompt_logprobs(to(hidden), to(ids), 9, 3, lambda h: (h @ w.T).float())

    want = run(lambda t: t)
    with VirtualCuda():
        got = run(lambda t: t.to("cuda:0"))
    assert [(lp.token_id, round(lp.logprob or 0, 5), lp.top) for lp in got] == \
           [(lp.token_id, round(lp.logprob or 0, 5), lp.top) for lp in want]
