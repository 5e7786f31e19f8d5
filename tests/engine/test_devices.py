"""The engine's tensor parts on devices this machine does not have: under FakeTensorMode, tensors on `cuda:0` and
`cuda:1` carry shapes and devices but no data, and any op that mixes devices raises, as CUDA would. (A CPU-only
torch refuses Python indexing of fake CUDA tensors, so the code under test uses narrow/index_select.)"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from server.engine.batch import Batch
from server.engine.beam import BeamGroup
from server.engine.kvcache import KVCache, InPlaceLayer


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
