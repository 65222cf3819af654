"""Shared fixtures and test configuration."""

import os

import numpy as np
import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Every architecture at a mean L0 of 4 (k, or the target of the calibrated ones).
AT_L0_4 = {
    "topk": dict(architecture="topk", k=4),
    "batchtopk": dict(architecture="batchtopk", k=4),
    "matryoshka": dict(architecture="matryoshka", k=4),
    "jumprelu": dict(architecture="jumprelu", target_l0=4),
    "gated": dict(architecture="gated", target_l0=4),
    "relu": dict(architecture="relu", target_l0=4),
}


def make_sparse_dataset(
    n_samples=8192, n_features=32, n_true=64, p_active=4 / 64, noise=0.01, offset=0.3, seed=0
):
    """Sparse combinations of random unit directions plus Gaussian noise and an offset.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32
    directions : ndarray of shape (n_true, n_features)
        The ground-truth unit directions.
    """
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_true, n_features))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    active = rng.random((n_samples, n_true)) < p_active
    magnitudes = rng.uniform(0.5, 1.5, size=(n_samples, n_true)) * active
    X = magnitudes @ directions + noise * rng.normal(size=(n_samples, n_features)) + offset
    return X.astype(np.float32), directions


def mean_max_cosine(directions, learned):
    """For each true direction, the best cosine similarity among learned rows; averaged."""
    learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((directions @ learned.T).max(axis=1).mean())


@pytest.fixture(scope="session")
def sparse_dataset():
    return make_sparse_dataset()


@pytest.fixture
def small_X():
    return np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)


CHARS = list("abcdefghijklmnopqrstuvwxyz .,'")


def make_char_tokenizer(add_bos=False):
    """A character-level tokenizer over lowercase text; optionally prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", *CHARS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


# Text for a byte-level BPE: curly quotes, accents and dashes make multi-byte merges.
BYTE_TEXTS = [
    "don’t stop, it’s the café’s naïve résumé — said the king.\n",
    "the king’s “crown” is gold — the queen’s is silver.\n\tindented line",
] * 20


def make_byte_level_tokenizer(vocab_size=300):
    """A GPT-2 style byte-level BPE trained offline on BYTE_TEXTS (all 256 bytes known)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<bos>", "<eos>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(BYTE_TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def make_tiny_model(family, *, n_layers=3, vocab_size=64, n_positions=64, tied=None):
    """A random causal LM of the given family ("gpt2", "llama", "gemma"), built offline.

    ``tied``: tie the unembedding to the embedding (None: the family's default).
    """
    import transformers as tf

    small = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    if tied is not None:
        small["tie_word_embeddings"] = tied
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if family == "gpt2":
            config = tf.GPT2Config(
                n_layer=n_layers, n_embd=16, n_head=2, n_positions=n_positions, **small
            )
            return tf.GPT2LMHeadModel(config).eval()
        llama_shape = dict(
            num_hidden_layers=n_layers,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=n_positions,
            **small,
        )
        if family == "gemma":
            return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=8, **llama_shape)).eval()
        return tf.LlamaForCausalLM(tf.LlamaConfig(**llama_shape)).eval()


def byte_level_extractor_and_sae(texts):
    """A random 2-block GPT-2 over `make_byte_level_tokenizer`, and a TopK SAE on ``texts``."""
    from skSAE import ActivationExtractor, SparseAutoencoder

    tokenizer = make_byte_level_tokenizer()
    model = make_tiny_model("gpt2", n_layers=2, vocab_size=len(tokenizer))
    extractor = ActivationExtractor(
        model, tokenizer=tokenizer, layer=1, context_size=32, device="cpu"
    )
    sae = SparseAutoencoder(n_components=16, k=4, max_iter=1, device="cpu", random_state=0)
    return extractor, sae.fit(extractor.transform(texts))


def smollm2_extractor(**params):
    """An extractor of SmolLM2-135M at block 6, or skip the test where it cannot load."""
    from skSAE import ActivationExtractor, corpora

    pytest.importorskip("gguf", reason="loading GGUF needs the gguf package")
    pytest.importorskip("accelerate", reason="loading GGUF needs the accelerate package")
    try:
        path = corpora.smollm2_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    return ActivationExtractor(path, layer=6, device="cpu", **params)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model_dir(request, tmp_path_factory):
    """A saved tiny model and tokenizer folder, loadable by path."""
    folder = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param).save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


TEXTS = [
    "the quick brown fox jumps over the lazy dog.",
    "to be, or not to be, that is the question.",
    "a",
    "sparse autoencoders find directions in activation space, one latent at a time.",
]
