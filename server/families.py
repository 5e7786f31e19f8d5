"""Model families: how each one is prompted and which tokens end its answers. Data, not code paths.

A family's chat template is Jinja, rendered by the tokenizer like any Hugging Face chat template, so
`--chat-template FILE` replaces it uniformly. `None` means the family has no chat format of its own:
`hf` then uses the model's own template, and PolyLM base models refuse chat requests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Previous assistant turns end with the end-of-sequence token, the token the model itself emits to end a
# turn; a system message has no role in these formats, so it opens the first user turn as a paragraph.
_FIRST_USER = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m.role == 'system' -%}{%- set ns.system = ns.system + m.content + '\\n\\n' -%}{%- endfor -%}"
    "{%- set ns.first = true -%}"
)
_USER = "{%- set text = (ns.system if ns.first else '') + m.content -%}{%- set ns.first = false -%}"

POLYLM_CHAT_TEMPLATE = (
    _FIRST_USER
    + "{%- for m in messages if m.role != 'system' -%}"
    + "{%- if m.role == 'user' -%}" + _USER + "{{ '<|user|>\\n' + text + '\\n<|assistant|>\\n' }}"
    + "{%- else -%}{{ m.content }}{{ eos_token }}{%- endif -%}"
    + "{%- endfor -%}"
)
POLYLM_MULTIALPACA_TEMPLATE = (
    _FIRST_USER
    + "{%- for m in messages if m.role != 'system' -%}"
    + "{%- if m.role == 'user' -%}" + _USER + "{{ text + '\\n\\n' }}"
    + "{%- else -%}{{ m.content }}{{ eos_token }}{%- endif -%}"
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
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)


_POLYLM_TOKENIZER = {"legacy": False, "use_fast": False}  # as the PolyLM usage scripts load it
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("polylm", "PolyLM base model", chat=False, eos_token_ids=(2,), tokenizer_kwargs=_POLYLM_TOKENIZER),
        Family("polylm-multialpaca", "PolyLM-MultiAlpaca", POLYLM_MULTIALPACA_TEMPLATE, eos_token_ids=(2,),
               tokenizer_kwargs=_POLYLM_TOKENIZER),
        Family("polylm-chat", "PolyLM-Chat", POLYLM_CHAT_TEMPLATE, eos_token_ids=(2,), tokenizer_kwargs=_POLYLM_TOKENIZER),
        Family("bloomz", "BLOOMZ", BLOOMZ_TEMPLATE),
        Family("hf", "Hugging Face model"),
    )
}
FAMILY_CHOICES = ["auto", *FAMILIES]

# Checked in order against the model's names (directory, hub id, `_name_or_path`), lower case.
_NAME_RULES = (
    (r"polylm.*(multialpaca|multi-alpaca)", "polylm-multialpaca"),
    (r"polylm.*(chat|assistant)", "polylm-chat"),  # ModelScope calls PolyLM-Chat "assistant"
    (r"polylm", "polylm"),
    (r"bloomz", "bloomz"),
)
POLYLM_VOCAB = 256000


def detect(config: Any, names: list[str], has_sentencepiece: bool) -> Family:
    """The family of a model from its config, its names and its tokenizer files; `hf` if nothing matches."""
    text = " ".join([*names, str(getattr(config, "_name_or_path", ""))]).lower()
    for pattern, family in _NAME_RULES:
        if re.search(pattern, text):
            return FAMILIES[family]
    model_type = getattr(config, "model_type", "")
    auto_map = " ".join(map(str, (getattr(config, "auto_map", None) or {}).values())).lower()
    if model_type == "polylm" or "polylm" in auto_map:
        return FAMILIES["polylm"]
    # A GPT-2 network with a SentencePiece tokenizer of 256K pieces is PolyLM, whatever its folder is called.
    if model_type == "gpt2" and has_sentencepiece and getattr(config, "vocab_size", 0) == POLYLM_VOCAB:
        return FAMILIES["polylm"]
    if model_type == "bloom":
        return FAMILIES["bloomz"]
    return FAMILIES["hf"]
