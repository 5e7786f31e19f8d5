"""Loading PolyLM- and BLOOMZ-shaped checkpoints: tokenizers, custom code, dtypes, device maps, quantization."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import requires

import pytest
import torch

from server.config import Settings
from server.engine.loader import ModelLoadError, cpu_has_bf16, load, parse_max_memory, resolve_dtype
from tests.conftest import ROOT


def test_polylm_sentencepiece_tokenizer_is_converted_at_load(family_models):
    path = family_models["polylm-chat"]
    assert (path / "tokenizer.model").exists() and not (path / "tokenizer.json").exists()  # as PolyLM ships it
    loaded = load(Settings(model=str(path)))
    tok = loaded.tokenizer
    assert loaded.family.name == "polylm-chat" and tok.eos_token_id == 2
    text = "北京是中国的首都。 ปักกิ่ง بكين"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok("<|user|>", add_special_tokens=False)["input_ids"]) == ["<|user|>"]


def test_protobuf_is_a_dependency_and_its_absence_is_named(family_models):
    assert any(r.startswith("protobuf") for r in requires("polyglot-server"))
    # Without protobuf transformers would report a missing tiktoken; the loader says what is really missing.
    code = (
        "import sys; sys.modules['google.protobuf'] = None\n"
        "from server.config import Settings\nfrom server.engine.loader import load, ModelLoadError\n"
        f"try:\n    load(Settings(model={str(family_models['polylm-chat'])!r}))\n"
        "except ModelLoadError as e:\n    print('ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "ERROR" in out and "pip install protobuf" in out, out


def test_custom_code_needs_the_flag(family_models):
    base = str(family_models["polylm-base"])
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load(Settings(model=base))
    loaded = load(Settings(model=base, trust_remote_code=True))
    assert type(loaded.model).__name__ == "PolyLMForCausalLM" and loaded.family.name == "polylm"
    assert loaded.tokenizer.chat_template is None  # a base model has no chat format


def test_start_up_without_the_flag_names_it(family_models):
    r = subprocess.run([sys.executable, "-m", "server", "--port", "1", "--model", str(family_models["polylm-base"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "--trust-remote-code" in r.stderr


def test_dtype_auto_keeps_bf16_checkpoints_in_bf16_where_the_cpu_can(family_models, tmp_path):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, torch.float32) == torch.float32
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float32  # fp16 matmuls are slow on CPUs
    assert resolve_dtype("float16", cpu, torch.float32) == torch.float16  # asked for explicitly
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(family_models["polylm-multialpaca"], bf16_dir)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load(Settings(model=str(bf16_dir)))
    expected = torch.bfloat16 if cpu_has_bf16() else torch.float32
    print(f"this CPU computes bf16 natively: {cpu_has_bf16()}")
    assert loaded.model.dtype == expected and loaded.dtype == expected


def test_device_map_auto_places_every_layer(family_models):
    loaded = load(Settings(model=str(family_models["bloomz"]), device_map="auto"))
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert {str(p.device) for p in loaded.model.parameters()} == {expected}
    assert str(loaded.device) == expected
    with pytest.raises(ModelLoadError, match="only with --device-map"):
        load(Settings(model=str(family_models["bloomz"]), max_memory="cpu=1GiB"))
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(ModelLoadError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantization_without_cuda_fails_clearly(family_models, kind):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load(Settings(model=str(family_models["bloomz"]), quantization=kind))


def test_generation_config_defaults_are_read(family_models):
    loaded = load(Settings(model=str(family_models["polylm-chat"])))
    assert loaded.generation_defaults == {"num_beams": 4, "early_stopping": True}
    assert load(Settings(model=str(family_models["polylm-chat"]), generation_config="none")).generation_defaults == {}


def test_the_gguf_default_model_runs_in_bf16_where_the_cpu_can():
    print(f"this CPU computes bf16 natively: {cpu_has_bf16()}")
    assert load(Settings()).dtype == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
