"""Shared fixtures and test configuration."""

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# derandomize: the same examples on every run; database=None: no .hypothesis folder
# replays a failure found on another run (or machine), so no run depends on an earlier one.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ------------------------------------------------------------ codes near a cut
# A float32 pre-activation computed by two kernels (torch's MKL, NumPy's OpenBLAS, a
# matrix-vector against a matrix-matrix product, another thread count) may differ in
# its last bits, so an entry that sits within that rounding of a cut (a threshold, or
# a row's k-th largest value under top-k) may be active in one and zero in the other.
# Element-wise checks of thresholded or top-k codes leave such entries out; the rest
# must agree within the same rounding.


def encoder_pre_activations(sae, X):
    """``X @ W_enc_ + b_enc_`` in float64, and a bound on any float32 rounding of it.

    ``X`` is read as float32, as the SAE reads it. The bound is ``(n_features + 3)``
    times float32's epsilon times the sum of magnitudes ``|X| @ |W_enc_| + |b_enc_| +
    |threshold_|``: twice the worst case of a float32 dot product (Higham's gamma_n)
    for any order of summation, with or without fused multiply-adds. It is per entry,
    so a pre-activation that is small by cancellation of large terms gets a large one.

    Returns
    -------
    pre : ndarray of shape (n_samples, n_components)
    bound : ndarray of shape (n_samples, n_components)
    """
    X = np.asarray(X, dtype=np.float32).astype(np.float64)
    W, b = sae.W_enc_.astype(np.float64), sae.b_enc_.astype(np.float64)
    threshold = np.abs(np.asarray(getattr(sae, "threshold_", 0.0), dtype=np.float64))
    magnitude = np.abs(X) @ np.abs(W) + np.abs(b) + threshold
    return X @ W + b, (X.shape[1] + 3) * float(np.finfo(np.float32).eps) * magnitude


def code_activation(sae):
    """The inference activation of a fitted SAE: ``{"threshold": ..., "k": ...}``.

    Codes are ``pre * (pre > threshold)`` (``threshold_``, or 0 for ReLU), or with a
    ``k`` the ``k`` largest of each row, ReLU applied (TopK, which has no threshold).
    """
    if hasattr(sae, "threshold_"):
        return {"threshold": np.asarray(sae.threshold_, dtype=np.float64), "k": None}
    return {"threshold": 0.0, "k": sae._fit_options.get("k")}


def codes_of(pre, threshold=0.0, k=None):
    """``act(pre)`` in float64 (see `code_activation`); ties go to the lower index."""
    if k is None or k >= pre.shape[1]:
        return np.where(pre > threshold, pre, 0.0) if k is None else np.maximum(pre, 0.0)
    codes = np.zeros_like(pre)
    index = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    codes[rows, index] = np.maximum(pre[rows, index], 0.0)
    return codes


def undecided_codes(pre, bound, threshold=0.0, k=None):
    """Entries of ``act(pre)`` that a rounding of ``pre`` within ``bound`` could flip.

    Those within ``bound`` of the threshold and, under top-k, where a row's k-th and
    (k+1)-th largest values lie within twice the row's bound of each other, those
    between them (give or take the bound): rounding may swap them across the cut.
    """
    bound = np.broadcast_to(bound, pre.shape)
    undecided = np.abs(pre - threshold) <= bound
    if k is not None and k < pre.shape[1]:
        ordered = np.sort(pre, axis=1)
        kth, next_ = ordered[:, -k, None], ordered[:, -k - 1, None]
        row_bound = bound.max(axis=1, keepdims=True)
        close = kth - next_ <= 2 * row_bound
        undecided |= close & (pre >= next_ - row_bound) & (pre <= kth + row_bound)
    return undecided


def assert_codes_agree(codes, other, undecided, atol, max_undecided=0.05):
    """``codes == other`` within ``atol`` (per entry) outside ``undecided``.

    At most ``max_undecided`` of the entries may be left out, so the check stays one.
    """
    codes = np.asarray(codes, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    assert codes.shape == other.shape
    assert undecided.mean() <= max_undecided, (
        f"{undecided.mean():.1%} of the codes sit at a cut: too many to leave out"
    )
    wrong = ~undecided & (np.abs(codes - other) > np.broadcast_to(atol, codes.shape))
    if wrong.any():
        first = list(zip(*np.nonzero(wrong), strict=True))[:5]
        pairs = [(index, codes[index], other[index]) for index in first]
        raise AssertionError(
            f"{wrong.sum()} of the {(~undecided).sum()} codes away from a cut differ beyond "
            f"float32 rounding; the first (index, codes, other): {pairs}"
        )


def assert_either_side(codes, pre, undecided, tolerance, k=None):
    """Each undecided code is one of the two outcomes of its cut: 0, or active."""
    codes = np.asarray(codes, dtype=np.float64)
    active = pre if k is None else np.maximum(pre, 0.0)
    either = (codes == 0) | (np.abs(codes - active) <= tolerance)
    assert either[undecided].all(), "a code at a cut is neither 0 nor its pre-activation"


def assert_codes_match(codes, sae, X, extra_tolerance=0.0, max_undecided=0.05):
    """``codes == act(X @ W_enc_ + b_enc_)`` of a fitted SAE, whatever kernel made them.

    Entries within float32 rounding of a cut (`undecided_codes`) may be 0 or active;
    the rest agree within that rounding plus ``extra_tolerance``. Returns the mask of
    undecided entries.
    """
    pre, bound = encoder_pre_activations(sae, X)
    activation = code_activation(sae)
    tolerance = bound + extra_tolerance
    undecided = undecided_codes(pre, tolerance, **activation)
    assert_codes_agree(codes, codes_of(pre, **activation), undecided, tolerance, max_undecided)
    assert_either_side(codes, pre, undecided, tolerance, activation["k"])
    return undecided


def assert_same_codes(codes, other, sae, X, max_undecided=0.05):
    """Two float32 computations of the codes of ``X`` (another row count, block size or
    device) agree, except where rounding may flip an entry across a cut."""
    pre, bound = encoder_pre_activations(sae, X)
    activation = code_activation(sae)
    undecided = undecided_codes(pre, bound, **activation)
    assert_codes_agree(codes, other, undecided, 2 * bound, max_undecided)
    for each in (codes, other):
        assert_either_side(each, pre, undecided, bound, activation["k"])
    return undecided


def explained_variance_slack(sae, X, undecided):
    """How far the explained variance of ``X`` may move when its ``undecided`` codes flip.

    A flip between 0 and the pre-activation moves a row's reconstruction by at most
    ``|pre| * ||components_[j]||``; its squared error by at most ``2 |e| d + d**2``.
    """
    if not undecided.any():
        return 0.0
    pre, _ = encoder_pre_activations(sae, X)
    activation = code_activation(sae)
    X = np.asarray(X, dtype=np.float32).astype(np.float64)
    components = sae.components_.astype(np.float64)
    error = X - (codes_of(pre, **activation) @ components + sae.b_dec_)
    moved = (np.abs(pre) * undecided) @ np.linalg.norm(components, axis=1)
    change = 2 * np.linalg.norm(error, axis=1) * moved + moved**2
    return float(change.sum() / np.square(X - X.mean(axis=0)).sum())


def code_statistics_slack(sae, X):
    """How far statistics of the codes of ``X`` may move between two computations of
    them (another block of rows, another kernel): each undecided code may flip.

    Returns
    -------
    slack : dict
        ``"l0"`` (mean non-zeros per row), ``"density"`` (per latent), ``"dead_fraction"``
        and ``"explained_variance"``; all 0.0 when no code sits at a cut, the usual case.
    """
    pre, bound = encoder_pre_activations(sae, X)
    undecided = undecided_codes(pre, bound, **code_activation(sae))
    n_rows, n_components = undecided.shape
    return {
        "l0": undecided.sum() / n_rows,
        "density": undecided.sum(axis=0) / n_rows,
        "dead_fraction": undecided.any(axis=0).sum() / n_components,
        "explained_variance": explained_variance_slack(sae, X, undecided),
    }


def assert_ranked(texts, values_V, text_of, tolerance, largest=True):
    """``texts`` name the tokens of the largest (or smallest) ``values_V`` in order, a
    token tied within ``tolerance`` with the one ranked there standing in for it.

    ``text_of(ids)`` gives the texts of token ids. The values are computed elsewhere in
    float32, so near-ties (at a top-k cut, or between neighbours) may order either way.
    """
    ranked = np.sort(values_V)[::-1] if largest else np.sort(values_V)
    for position, text in enumerate(texts):
        tied = np.flatnonzero(np.abs(values_V - ranked[position]) <= tolerance)
        assert text in text_of(tied.tolist()), (position, text, ranked[position])


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


def mount_tmpfs(folder, options):
    """Mount a tmpfs on ``folder`` with ``options`` (root with mount), else skip the test.

    The disk-full tests fill a small tmpfs of their own; the caller unmounts it.
    """
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("filling a disk needs a tmpfs of its own: mounting one needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
