"""Model families: how each one is prompted and which tokens end its answers. Data, not code paths.

A family's chat template is Jinja, rendered by the tokenizer like any Hugging Face chat template, so
`--chat-template FILE` replaces it uniformly. `None` means the family has no chat format of its own:
`hf` then uses the model's own template, and PolyLM base models refuse chat requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# A system message has no role in the PolyLM formats, so it opens the first user turn as a paragraph.
_FIRST_USER = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m.role == 'system' -%}{%- set ns.system = ns.system + m.content + '\\n\\n' -%}{%- endfor -%}"
    "{%- set ns.first = true -%}"
)
_USER = "{%- set text = (ns.system if ns.first else '') + m.content -%}{%- set ns.first = false -%}"

# PolyLM-Chat: previous assistant turns end with the end-of-sequence token, the token the model itself emits to end
# a turn (our choice: the published demo's multi-turn format is not known).
POLYLM_CHAT_TEMPLATE = (
    _FIRST_USER
    + "{%- for m in messages if m.role != 'system' -%}"
    + "{%- if m.role == 'user' -%}" + _USER + "{{ '<|user|>\\n' + text + '\\n<|assistant|>\\n' }}"
    + "{%- else -%}{{ m.content }}{{ eos_token }}{%- endif -%}"
    + "{%- endfor -%}"
)
# As the authors' MultiAlpaca demos write a conversation: each past turn "{query}\n\n{response}\n", no end token.
POLYLM_MULTIALPACA_TEMPLATE = (
    _FIRST_USER
    + "{%- for m in messages if m.role != 'system' -%}"
    + "{%- if m.role == 'user' -%}" + _USER + "{{ text + '\\n\\n' }}"
    + "{%- else -%}{{ m.content + '\\n' }}{%- endif -%}"
    + "{%- endfor -%}"
)
# BLOOMZ answers a single instruction: the conversation's texts, one paragraph each, are the prompt.
BLOOMZ_TEMPLATE = "{%- for m in messages -%}{{ m.content }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}{%- endfor -%}"


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    chat_template: str | None = None  # None: the model's own template (hf), or no chat at all (polylm)
    chat: bool = True  # False: chat requests get a 400 unless --chat-template is given
    eos_token_ids: tuple[int, ...] = ()  # ends an answer, whatever the checkpoint's config says
    # The tokenizer is built from tokenizer.model's own SentencePiece spec (normalizer included) and checked against
    # SentencePiece at start-up, instead of transformers' Llama-style conversion, which ignores the normalizer.
    sentencepiece: bool = False
    # bos/eos ids equal to vocab_size - 1 in config.json are the checkpoint converter's placeholder, not tokens.
    placeholder_eos: bool = False
    # Decoding defaults for checkpoints without a generation_config.json (a request's own values win).
    generation_defaults: dict[str, Any] = field(default_factory=dict)


# The authors' own web and command-line demos for MultiAlpaca and Chat sample with these (their model cards show
# 4-beam search instead: send "num_beams": 4, "early_stopping": true).
POLYLM_DEMO_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.02}
_POLYLM = {"eos_token_ids": (2,), "sentencepiece": True, "placeholder_eos": True}
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("polylm", "PolyLM base model", chat=False, **_POLYLM),
        Family("polylm-multialpaca", "PolyLM-MultiAlpaca", POLYLM_MULTIALPACA_TEMPLATE,
               generation_defaults=POLYLM_DEMO_SAMPLING, **_POLYLM),
        Family("polylm-chat", "PolyLM-Chat", POLYLM_CHAT_TEMPLATE, generation_defaults=POLYLM_DEMO_SAMPLING, **_POLYLM),
        Family("bloomz", "BLOOMZ", BLOOMZ_TEMPLATE),
        Family("hf", "Hugging Face model"),
    )
}
FAMILY_CHOICES = ["auto", *FAMILIES]

# Checked in order against the model's names (directory, hub or ModelScope id), lower case, with the network the
# family is built on: a BLOOM checkpoint in a folder called "polylm-..." is still BLOOM.
_NAME_RULES = (
    (r"polylm.*(multialpaca|multi-alpaca)", "polylm-multialpaca", "gpt2"),
    (r"polylm.*(chat|assistant)", "polylm-chat", "gpt2"),  # ModelScope calls PolyLM-Chat "assistant"
    (r"polylm", "polylm", "gpt2"),
    (r"bloomz", "bloomz", "bloom"),
)

def _model_folder(name: str) -> str:
    """The part of a path or hub id that names the model: its last part, or in a Hugging Face cache snapshot
    (`.../models--ORG--NAME/snapshots/REV`) the repository's folder. Parent folders say nothing of the model."""
    parts = [p for p in re.split(r"[/\\]", name.lower()) if p]
    if len(parts) >= 3 and parts[-2] == "snapshots":
        return parts[-3]
    return parts[-1] if parts else ""


def _by_name(names: list[str], model_type: str) -> str | None:
    for name in names:
        folder = _model_folder(name)
        for pattern, family, network in _NAME_RULES:
            if re.search(pattern, folder):
                return family if network == model_type else None
    return None


def detect(config: Any, names: list[str], has_sentencepiece: bool) -> tuple[Family, str]:
    """The family of a model from its names, its config and its tokenizer files, and what told it: "name",
    "config", "structure" (a guess: PolyLM's base, MultiAlpaca and Chat checkpoints have identical files) or
    "default" (`hf`)."""
    model_type = getattr(config, "model_type", "")
    by_name = _by_name([*names, str(getattr(config, "_name_or_path", ""))], model_type)
    if by_name:
        return FAMILIES[by_name], "name"
    auto_map = " ".join(map(str, (getattr(config, "auto_map", None) or {}).values())).lower()
    if model_type == "polylm" or "polylm" in auto_map:  # only PolyLM-13B (base) ships modeling_polylm.py
        return FAMILIES["polylm"], "config"
    # A GPT-2 network with a SentencePiece tokenizer.model is PolyLM (its Megatron converter's layout, 256,000 ids
    # in the published models), whatever its folder is called: GPT-2 models otherwise ship byte-level BPE files.
    if model_type == "gpt2" and has_sentencepiece:
        return FAMILIES["polylm"], "structure"
    if model_type == "bloom":
        return FAMILIES["bloomz"], "config"
    return FAMILIES["hf"], "default"
