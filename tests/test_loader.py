"""Loading the published PolyLM and BLOOMZ layouts (tiny copies built by scripts/make_test_models.py): their
remote code, the dtype read from the weights, tokenizers equal to SentencePiece, end tokens, decoding defaults,
device maps and quantization, and checkpoints that cannot load, each stopping with one plain line."""

import json
import logging
import re
import shutil
import subprocess
import sys
from importlib.metadata import requires

import pytest
import sentencepiece
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.build import build_engine
from server.config import Settings
from server.engine.checkpoint import tensor_dtypes, weight_files
from server.engine.loader import (
    SENTENCEPIECE_CHECKS,
    ModelLoadError,
    check_sentencepiece,
    cpu_choice,
    load,
    parse_max_memory,
    resolve_dtype,
)
from server.families import POLYLM_DEMO_SAMPLING
from tests.conftest import ROOT

POLYLM = ("polylm-1.7b", "polylm-13b", "polylm-multialpaca-13b", "polylm-chat-13b", "polylm-1.7b-nfkc")
LANGUAGES = [line for line in (ROOT / "scripts" / "data" / "multilingual.txt").read_text().splitlines() if line]


def copy(family_models, name, tmp_path, folder=None):
    target = tmp_path / (folder or name)
    shutil.copytree(family_models[name], target)
    return target


def test_the_fixtures_have_the_published_files_and_keys(family_models):
    """What the tests below rely on, as the published checkpoints have it (../shared/research/real-checkpoints.md)."""
    shards = {"polylm-1.7b": 1, "polylm-13b": 4, "polylm-multialpaca-13b": 2, "polylm-chat-13b": 4}
    for name, count in shards.items():
        path = family_models[name]
        config = json.loads((path / "config.json").read_text())
        assert config["model_type"] == "gpt2" and "dtype" not in config and "torch_dtype" not in config
        assert not (path / "generation_config.json").exists() and not (path / "tokenizer.json").exists()
        assert (path / "tokenizer_config.json").stat().st_size == 701
        assert (path / "special_tokens_map.json").stat().st_size == 411
        files = weight_files(path)
        assert len(files) == count and all(f.suffix == ".bin" for f in files)
        assert set(tensor_dtypes(files[0])) == {torch.bfloat16}
        keys = set(torch.load(files[0], map_location="meta", mmap=True, weights_only=True))
        assert "transformer.h.0.attn.bias" in keys and "transformer.h.0.attn.masked_bias" in keys
        if name != "polylm-13b":
            assert config["eos_token_id"] == config["bos_token_id"] == config["vocab_size"] - 1
    p13 = json.loads((family_models["polylm-13b"] / "config.json").read_text())
    assert p13["architectures"] == ["PolyLMHeadModel"] and p13["eos_token_id"] == 2 and "bos_token_id" not in p13
    assert p13["auto_map"] == {"AutoModelForCausalLM": "modeling_polylm.PolyLMHeadModel"}
    index = json.loads((family_models["polylm-13b"] / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert "lm_head.weight" in index  # stored as its own copy, as the 13B files are
    # the stand-in module fails to import on transformers 5 as the published one does
    with pytest.raises(ImportError, match="SequenceSummary"):
        AutoModelForCausalLM.from_pretrained(family_models["polylm-13b"], trust_remote_code=True)
    bloomz = family_models["bloomz-560m"]
    config = json.loads((bloomz / "config.json").read_text())
    assert "n_embed" in config and "num_attention_heads" in config and "dtype" not in config
    assert config["vocab_size"] == len(AutoTokenizer.from_pretrained(bloomz)) + 200
    assert (bloomz / "tokenizer_config.json").stat().st_size == 222
    assert set(tensor_dtypes(bloomz / "pytorch_model.bin")) == {torch.float16}
    assert not any(k.startswith(("transformer.", "lm_head")) for k in torch.load(bloomz / "pytorch_model.bin",
                                                                                 weights_only=True))


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_polylm_13b_loads_transformers_gpt2_on_purpose(family_models, trust_remote_code, caplog):
    with caplog.at_level(logging.INFO, logger="server.engine.loader"):
        loaded = load(Settings(model=str(family_models["polylm-13b"]), trust_remote_code=trust_remote_code))
    assert type(loaded.model).__name__ == "GPT2LMHeadModel" and loaded.family.name == "polylm"
    assert "loading transformers' own GPT2LMHeadModel" in caplog.text
    assert loaded.tokenizer.chat_template is None  # a base model has no chat format


def own_code_checkpoint(family_models, tmp_path, modeling: str):
    """A checkpoint with a model_type of its own and the code for it (as many hub models ship), on PolyLM-1.7B's
    weights."""
    path = copy(family_models, "polylm-1.7b", tmp_path, "own-code")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="tiny-own", architectures=["TinyOwnForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyOwnConfig",
                            "AutoModelForCausalLM": "modeling_tiny.TinyOwnForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    (path / "configuration_tiny.py").write_text(
        "from transformers import GPT2Config\n\n\nclass TinyOwnConfig(GPT2Config):\n    model_type = 'tiny-own'\n")
    (path / "modeling_tiny.py").write_text(modeling)
    return path


WORKING_CODE = """from transformers import GPT2LMHeadModel

from .configuration_tiny import TinyOwnConfig


class TinyOwnForCausalLM(GPT2LMHeadModel):
    config_class = TinyOwnConfig
"""


def test_own_code_needs_the_flag_and_runs_with_it(family_models, tmp_path):
    path = str(own_code_checkpoint(family_models, tmp_path, WORKING_CODE))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load(Settings(model=path))
    loaded = load(Settings(model=path, trust_remote_code=True))
    assert type(loaded.model).__name__ == "TinyOwnForCausalLM" and loaded.family.name == "hf"


def test_dtype_auto_reads_the_weights_when_the_config_has_none(family_models, tmp_path):
    native = torch.bfloat16 if cpu_choice().dtype == "bfloat16" else torch.float32  # where faster here (cpu.py)
    print(f"bf16 checkpoints run here in {native}")
    for name in ("polylm-1.7b", "polylm-13b"):  # one .bin; four shards with an index
        loaded = load(Settings(model=str(family_models[name])))
        assert loaded.checkpoint_dtype == "bfloat16" and loaded.dtype == loaded.model.dtype == native
    bloomz = load(Settings(model=str(family_models["bloomz-560m"])))  # model.safetensors, read from its header
    assert bloomz.checkpoint_dtype == "float16" and bloomz.dtype == torch.float32  # fp16 matmuls are slow on CPUs
    bin_only = copy(family_models, "bloomz-560m", tmp_path)
    (bin_only / "model.safetensors").unlink()
    assert load(Settings(model=str(bin_only))).checkpoint_dtype == "float16"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cuda, torch.float16) == torch.float16  # fp16 BLOOMZ stays fp16 on a GPU
    assert resolve_dtype("auto", cpu, torch.bfloat16) == native
    assert resolve_dtype("float16", cpu, torch.float32) == torch.float16  # asked for explicitly


@pytest.mark.parametrize("name", POLYLM)
def test_tokens_equal_sentencepiece_in_every_language(family_models, name):
    path = family_models[name]
    tokenizer = load(Settings(model=str(path))).tokenizer
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    for text in [*LANGUAGES, *SENTENCEPIECE_CHECKS, "<|user|>\n北京是中国的首都。\n<|assistant|>\n"]:
        assert tokenizer(text)["input_ids"] == processor.encode(text), text  # as a prompt is tokenized: no BOS
    assert tokenizer.eos_token_id == 2 and tokenizer.convert_ids_to_tokens(2) == "</s>"


def test_a_tokenizer_that_differs_from_sentencepiece_is_named(family_models, caplog):
    # transformers' own conversion of the NFKC model (a Llama-style BPE without the model's normalizer)
    path = family_models["polylm-1.7b-nfkc"]
    converted = AutoTokenizer.from_pretrained(path, legacy=False, use_fast=False)
    with caplog.at_level(logging.WARNING, logger="server.engine.loader"):
        text = check_sentencepiece(converted, path / "tokenizer.model")
    assert text in SENTENCEPIECE_CHECKS and repr(text) in caplog.text and "differ from SentencePiece" in caplog.text
    served = load(Settings(model=str(path))).tokenizer
    assert check_sentencepiece(served, path / "tokenizer.model") is None


def test_the_converters_placeholder_id_does_not_end_answers(family_models):
    engine, _ = build_engine(Settings(model=str(family_models["polylm-1.7b"])))  # its config: eos 1023
    assert engine.eos_ids == {2}


def test_family_defaults_where_the_checkpoint_has_no_generation_config(family_models):
    for name in ("polylm-chat-13b", "polylm-multialpaca-13b"):
        assert load(Settings(model=str(family_models[name]))).generation_defaults == POLYLM_DEMO_SAMPLING
        assert load(Settings(model=str(family_models[name]), generation_config="none")).generation_defaults == {}
    for name in ("polylm-1.7b", "polylm-13b", "bloomz-560m"):
        assert load(Settings(model=str(family_models[name]))).generation_defaults == {}


def test_a_checkpoints_own_generation_config_wins_over_the_family(family_models, tmp_path):
    path = copy(family_models, "polylm-chat-13b", tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"num_beams": 4, "early_stopping": True}))
    assert load(Settings(model=str(path))).generation_defaults == {"num_beams": 4, "early_stopping": True}


def test_a_renamed_polylm_folder_is_a_guess_that_says_so(family_models, tmp_path, caplog):
    path = str(copy(family_models, "polylm-chat-13b", tmp_path, "model"))  # as mounted at /models/model
    with caplog.at_level(logging.WARNING, logger="server.engine.loader"):
        assert load(Settings(model=path)).family.name == "polylm"
    assert "guessed" in caplog.text and "--model-family polylm-chat" in caplog.text
    caplog.clear()
    loaded = load(Settings(model=path, model_family="polylm-chat"))
    assert loaded.family.name == "polylm-chat" and "guessed" not in caplog.text


def test_protobuf_is_a_dependency_and_its_absence_is_named(family_models):
    assert any(r.startswith("protobuf") for r in requires("polyglot-server"))
    assert any(r.startswith("torch>=2.6") for r in requires("polyglot-server"))  # PolyLM ships .bin pickles only
    # Without protobuf transformers would report a missing tiktoken; the loader says what is really missing.
    code = (
        "import sys; sys.modules['google.protobuf'] = None\n"
        "from server.config import Settings\nfrom server.engine.loader import load, ModelLoadError\n"
        f"try:\n    load(Settings(model={str(family_models['polylm-chat-13b'])!r}))\n"
        "except ModelLoadError as e:\n    print('ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "ERROR" in out and "pip install protobuf" in out, out


def break_checkpoint(family_models, tmp_path, how: str):
    path = copy(family_models, "polylm-1.7b", tmp_path, f"broken-{how}")
    config = json.loads((path / "config.json").read_text())
    if how == "no-tokenizer":
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            (path / f).unlink()
    elif how == "unknown-architecture":
        config["model_type"] = "polylm2"
    elif how == "wider-than-the-weights":
        config["n_embd"] *= 2
    elif how == "missing-tensor":
        state = torch.load(path / "pytorch_model.bin", weights_only=True)
        del state["transformer.h.1.mlp.c_fc.weight"]
        torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("how", "says"), [
    ("no-tokenizer", r"no tokenizer .*tokenizer\.model"),
    ("unknown-architecture", r"config\.json: model_type 'polylm2' is not an architecture"),
    ("wider-than-the-weights", r"pytorch_model\.bin: the weights do not match config\.json: \S+ is \[(\d+, )?64\] in the "
                               r"weights but \[(\d+, )?128\] by config\.json"),
    ("missing-tensor", r"pytorch_model\.bin: the weights do not match config\.json: .*transformer\.h\.1\.mlp\.c_fc\.weight"),
])
def test_a_checkpoint_that_cannot_load_is_named_in_one_line(family_models, tmp_path, how, says):
    path = break_checkpoint(family_models, tmp_path, how)
    with pytest.raises(ModelLoadError) as caught:
        load(Settings(model=str(path)))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path)) and re.search(says, message), message


def test_start_up_prints_one_plain_line_and_no_traceback(family_models, tmp_path):
    """Through `python -m server`, as a user meets them: a checkpoint whose own code cannot be imported (it needs a
    name transformers 5 removed), and weights that do not match config.json. The two start side by side."""
    broken_code = own_code_checkpoint(family_models, tmp_path,
                                      "from transformers.modeling_utils import SequenceSummary\n" + WORKING_CODE)
    wider = break_checkpoint(family_models, tmp_path, "wider-than-the-weights")
    procs = [subprocess.Popen([sys.executable, "-m", "server", "--port", "1", "--model", str(path), *flags], cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for path, flags in ((broken_code, ["--trust-remote-code"]), (wider, []))]
    for proc, path, names in zip(procs, (broken_code, wider), (["modeling_tiny.py", "SequenceSummary"],
                                                               ["pytorch_model.bin", "do not match config.json"])):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "Traceback" not in err and "LOAD REPORT" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: {path}") and all(n in last for n in names), last


def test_device_map_auto_places_every_layer(family_models):
    loaded = load(Settings(model=str(family_models["bloomz-560m"]), device_map="auto"))
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert {str(p.device) for p in loaded.model.parameters()} == {expected}
    assert str(loaded.device) == expected
    with pytest.raises(ModelLoadError, match="only with --device-map"):
        load(Settings(model=str(family_models["bloomz-560m"]), max_memory="cpu=1GiB"))
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    with pytest.raises(ModelLoadError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantization_without_cuda_fails_clearly(family_models, kind):
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load(Settings(model=str(family_models["bloomz-560m"]), quantization=kind))


def test_the_gguf_default_model_runs_in_bf16_where_the_cpu_can():
    chosen = cpu_choice()
    print(f"bf16 checkpoints run here in {chosen.dtype}: {chosen.why}")
    loaded = load(Settings())
    assert str(loaded.dtype) == f"torch.{chosen.dtype}"
    assert loaded.onednn_min_tokens == (chosen.onednn_min_tokens if chosen.dtype == "bfloat16" else 0)
