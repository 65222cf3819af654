"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

import os

import torch


def busy_cpu_seconds():
    """CPU seconds all processes of the machine have used since boot (Linux); else None."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def save_character_llama(folder, texts, *, n_layers, hidden_size, seed=0):
    """Save a random Llama with a character-level tokenizer over ``texts`` to ``folder``.

    A stand-in for a real model where none is installed, or where only speed matters.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)))
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>"
    ).save_pretrained(folder)
    config = LlamaConfig(
        num_hidden_layers=n_layers,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(vocab),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # inside fork_rng: the global generator is restored after
        LlamaForCausalLM(config).save_pretrained(folder)
