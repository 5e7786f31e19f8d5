"""Decode and a prefill chunk in one forward (fused.py) against the two-forward path, on tiny real models."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engine import attention
from server.engine.runner import ModelRunner


@pytest.mark.parametrize("model_dir,supported", [("tiny_llama_dir", True), ("tiny_gpt2_dir", True),
                                                 ("tiny_bloom_dir", False)])
@pytest.mark.parametrize("call_pairs", [attention.CALL_PAIRS, 0])
def test_models_whose_attention_takes_the_fused_path_pass_the_check(request, monkeypatch, model_dir, supported,
                                                                    call_pairs):
    monkeypatch.setattr(attention, "CALL_PAIRS", call_pairs)  # 0: the decode rows attend by runs (attention.py)
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model_dir), dtype=torch.float32).eval()
    runner = ModelRunner(model, torch.device("cpu"))
    assert runner.enable_fused() is supported
    # BLOOM (ALiBi, its own attention code) keeps two forwards and its usual attention
    assert (model.config._attn_implementation == "polyglot_fused") is supported
