"""The generic hook route on several model families, built tiny from configs (offline)."""

import numpy as np
import pytest
import torch
from conftest import make_char_tokenizer

from skSAE import ActivationExtractor

TEXT = ["the residual stream of a tiny model, read one block at a time."]
COMMON = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(family):
    import transformers as tf

    small = dict(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=3,
        max_position_embeddings=64,
    )
    configs = {
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small, **COMMON)),
        "gemma": lambda: tf.GemmaForCausalLM(
            tf.GemmaConfig(**small, num_key_value_heads=2, head_dim=8, **COMMON)
        ),
        "qwen2": lambda: tf.Qwen2ForCausalLM(
            tf.Qwen2Config(**small, num_key_value_heads=2, **COMMON)
        ),
        "bert": lambda: tf.BertModel(tf.BertConfig(**small, **COMMON)),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return configs[family]().eval()


@pytest.mark.parametrize("family", ["gpt_neox", "gemma", "qwen2", "bert"])
def test_resid_post_matches_hidden_states(family):
    model = build(family)
    extractor = ActivationExtractor(
        model,
        tokenizer=make_char_tokenizer(),
        layer=1,
        context_size=64,
        device="cpu",
        drop_first_position=False,
    )
    acts = extractor.transform(TEXT)
    ids = extractor.tokenizer_(TEXT[0], add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(acts, hidden[2][0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "gemma", "qwen2"])
def test_decoder_families_expose_attn_and_mlp_hooks(family):
    model = build(family)
    for hook in ("attn_out", "mlp_out"):
        extractor = ActivationExtractor(
            model, tokenizer=make_char_tokenizer(), hook=hook, layer=2, device="cpu"
        )
        assert extractor.transform(TEXT).shape[1] == 16


def test_bert_without_mlp_module_lists_valid_hooks():
    extractor = ActivationExtractor(
        build("bert"), tokenizer=make_char_tokenizer(), hook="mlp_out", layer=1, device="cpu"
    )
    with pytest.raises(ValueError, match=r"valid hooks are \['resid_post', 'attn_out'\]"):
        extractor.transform(TEXT)
