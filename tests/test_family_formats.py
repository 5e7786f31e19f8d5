"""Family detection and the families' prompt formats, rendered by a real tokenizer's chat-template engine."""

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from server.families import FAMILIES, detect

SEED = "Beijing is the capital of China.\nTranslate this sentence from English to Chinese."


@pytest.mark.parametrize(
    ("names", "family"),
    [
        (["DAMO-NLP-MT/polylm-1.7b"], "polylm"),
        (["DAMO-NLP-MT/polylm-13b"], "polylm"),
        (["DAMO-NLP-MT/polylm-multialpaca-13b"], "polylm-multialpaca"),
        (["DAMO-NLP-MT/polylm-chat-13b"], "polylm-chat"),
        (["/models/nlp_polylm_13b_text_generation"], "polylm"),  # ModelScope ids
        (["/models/nlp_polylm_multialpaca_13b_text_generation"], "polylm-multialpaca"),
        (["/models/nlp_polylm_assistant_13b_text_generation"], "polylm-chat"),
        (["bigscience/bloomz-560m"], "bloomz"),
        (["/srv/bloomz-7b1-mt"], "bloomz"),
        (["HuggingFaceTB/SmolLM2-135M-Instruct"], "hf"),
    ],
)
def test_detect_by_name(names, family):
    assert detect(SimpleNamespace(model_type="gpt2"), names, has_sentencepiece=False).name == family


def test_detect_by_structure_when_the_folder_name_says_nothing():
    polylm_shaped = SimpleNamespace(model_type="gpt2", vocab_size=256000)
    assert detect(polylm_shaped, ["/models/m1"], has_sentencepiece=True).name == "polylm"
    assert detect(polylm_shaped, ["/models/m1"], has_sentencepiece=False).name == "hf"  # a GPT-2 BPE model
    own_code = SimpleNamespace(model_type="x", auto_map={"AutoModelForCausalLM": "modeling_polylm.PolyLMForCausalLM"})
    assert detect(own_code, ["/models/m2"], has_sentencepiece=True).name == "polylm"
    assert detect(SimpleNamespace(model_type="bloom"), ["/models/m3"], has_sentencepiece=False).name == "bloomz"
    assert detect(SimpleNamespace(model_type="llama"), ["/models/m4"], has_sentencepiece=True).name == "hf"


@pytest.fixture(scope="module")
def sp_tokenizer(family_models):
    return AutoTokenizer.from_pretrained(family_models["polylm-chat"], legacy=False, use_fast=False)


def render(tokenizer, family, messages):
    return tokenizer.apply_chat_template(
        messages, chat_template=FAMILIES[family].chat_template, tokenize=False, add_generation_prompt=True
    )


def test_single_turn_formats_are_the_seeds(sp_tokenizer):
    user = [{"role": "user", "content": SEED}]
    assert render(sp_tokenizer, "polylm-chat", user) == "<|user|>\n" + SEED + "\n<|assistant|>\n"
    assert render(sp_tokenizer, "polylm-multialpaca", user) == SEED + "\n\n"
    assert render(sp_tokenizer, "bloomz", user) == SEED


def test_multi_turn_and_system(sp_tokenizer):
    conversation = [
        {"role": "system", "content": "Answer in Chinese."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "你好!"},
        {"role": "user", "content": "Who are you?"},
    ]
    assert render(sp_tokenizer, "polylm-chat", conversation) == (
        "<|user|>\nAnswer in Chinese.\n\nHi\n<|assistant|>\n你好!</s><|user|>\nWho are you?\n<|assistant|>\n"
    )
    assert render(sp_tokenizer, "polylm-multialpaca", conversation) == (
        "Answer in Chinese.\n\nHi\n\n你好!</s>Who are you?\n\n"
    )
    assert render(sp_tokenizer, "bloomz", conversation) == "Answer in Chinese.\nHi\n你好!\nWho are you?"
    # the end token of a previous answer is PolyLM's eos, id 2, once tokenized
    ids = sp_tokenizer(render(sp_tokenizer, "polylm-chat", conversation))["input_ids"]
    assert ids.count(2) == 1


def test_polylm_families_end_on_token_2_and_base_has_no_chat():
    for name in ("polylm", "polylm-multialpaca", "polylm-chat"):
        assert FAMILIES[name].eos_token_ids == (2,)
    assert not FAMILIES["polylm"].chat and FAMILIES["polylm"].chat_template is None
    assert FAMILIES["hf"].chat_template is None and FAMILIES["hf"].chat
