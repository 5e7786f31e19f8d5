"""Family detection and the families' prompt formats, rendered by a real tokenizer's chat-template engine."""

from types import SimpleNamespace

import pytest

from server.config import Settings
from server.engine.loader import load
from server.families import FAMILIES, POLYLM_DEMO_SAMPLING, detect

SEED = "Beijing is the capital of China.\nTranslate this sentence from English to Chinese."


@pytest.mark.parametrize(
    ("names", "model_type", "family", "by"),
    [
        (["DAMO-NLP-MT/polylm-1.7b"], "gpt2", "polylm", "name"),
        (["DAMO-NLP-MT/polylm-13b"], "gpt2", "polylm", "name"),
        (["DAMO-NLP-MT/polylm-multialpaca-13b"], "gpt2", "polylm-multialpaca", "name"),
        (["DAMO-NLP-MT/polylm-chat-13b"], "gpt2", "polylm-chat", "name"),
        (["/models/nlp_polylm_13b_text_generation"], "gpt2", "polylm", "name"),  # ModelScope ids
        (["/models/nlp_polylm_multialpaca_13b_text_generation"], "gpt2", "polylm-multialpaca", "name"),
        (["/models/nlp_polylm_assistant_13b_text_generation"], "gpt2", "polylm-chat", "name"),
        (["/hf/hub/models--DAMO-NLP-MT--polylm-chat-13b/snapshots/1cde7e7"], "gpt2", "polylm-chat", "name"),  # HF cache
        (["/srv/polylm/chat-tests/polylm-13b"], "gpt2", "polylm", "name"),  # parent folders say nothing
        (["/srv/polylm-models/model"], "gpt2", "hf", "default"),
        (["bigscience/bloomz-560m"], "bloom", "bloomz", "name"),
        (["/srv/bloomz-7b1-mt"], "bloom", "bloomz", "name"),
        (["/srv/polylm-bloom"], "bloom", "bloomz", "config"),  # a BLOOM network in a folder called polylm is BLOOM
        (["HuggingFaceTB/SmolLM2-135M-Instruct"], "llama", "hf", "default"),
    ],
)
def test_detect_by_name(names, model_type, family, by):
    assert detect(SimpleNamespace(model_type=model_type), names, has_sentencepiece=False) == (FAMILIES[family], by)


def test_detect_by_structure_when_the_folder_name_says_nothing():
    gpt2 = SimpleNamespace(model_type="gpt2", vocab_size=256000)
    assert detect(gpt2, ["/models/model"], has_sentencepiece=True) == (FAMILIES["polylm"], "structure")  # a guess
    assert detect(gpt2, ["/models/model"], has_sentencepiece=False)[0].name == "hf"  # a GPT-2 BPE model
    polylm_13b = SimpleNamespace(model_type="gpt2", auto_map={"AutoModelForCausalLM": "modeling_polylm.PolyLMHeadModel"})
    assert detect(polylm_13b, ["/models/model"], has_sentencepiece=True) == (FAMILIES["polylm"], "config")
    assert detect(SimpleNamespace(model_type="bloom"), ["/models/m3"], has_sentencepiece=False)[0].name == "bloomz"
    assert detect(SimpleNamespace(model_type="llama"), ["/models/m4"], has_sentencepiece=True)[0].name == "hf"


@pytest.fixture(scope="module")
def sp_tokenizer(family_models):
    return load(Settings(model=str(family_models["polylm-chat-13b"]))).tokenizer


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
    # MultiAlpaca as the authors' demos write a conversation: "{query}\n\n{response}\n" per past turn, no </s>
    assert render(sp_tokenizer, "polylm-multialpaca", conversation) == (
        "Answer in Chinese.\n\nHi\n\n你好!\nWho are you?\n\n"
    )
    assert render(sp_tokenizer, "bloomz", conversation) == "Answer in Chinese.\nHi\n你好!\nWho are you?"
    # the end token of a previous answer is PolyLM's eos, id 2, once tokenized
    ids = sp_tokenizer(render(sp_tokenizer, "polylm-chat", conversation))["input_ids"]
    assert ids.count(2) == 1


def test_polylm_families_end_on_token_2_and_base_has_no_chat():
    for name in ("polylm", "polylm-multialpaca", "polylm-chat"):
        assert FAMILIES[name].eos_token_ids == (2,)
    assert not FAMILIES["polylm"].chat and FAMILIES["polylm"].chat_template is None
    # the authors' demo sampling for the instruction models, nothing for base models
    assert FAMILIES["polylm-chat"].generation_defaults == FAMILIES["polylm-multialpaca"].generation_defaults
    assert POLYLM_DEMO_SAMPLING == {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.02}
    assert FAMILIES["polylm"].generation_defaults == {} == FAMILIES["bloomz"].generation_defaults
    assert FAMILIES["hf"].chat_template is None and FAMILIES["hf"].chat
