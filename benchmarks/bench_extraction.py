"""Extraction speed: ActivationExtractor against a plain full forward pass, same run.

Both paths see the same contexts (batches of ``--batch-size`` x ``--context-size``
tokens of Python's pydoc topics) on the same model. The plain pass is what one writes
without skSAE: ``model(input_ids, attention_mask, output_hidden_states=True)`` under
``torch.inference_mode()``, keeping ``hidden_states[layer + 1]``. The extractor stops
after the hooked block, so its advantage grows as the layer gets shallower.

Run::

    python benchmarks/bench_extraction.py              # SmolLM2-135M if installed, else MiniLM
    python benchmarks/bench_extraction.py --quick      # tiny random model, seconds
"""

import argparse
import statistics
import time

import numpy as np
import torch
from _shared import save_character_llama

from skSAE import ActivationExtractor, corpora


def plain_forward_tokens_per_second(extractor, texts, layer):
    """Tokens/second of full forward passes over the extractor's own batches."""
    model, _ = extractor.load()
    device = next(model.parameters()).device
    n_tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in extractor._batches(texts, device):
            output = model(
                input_ids=batch.input_ids_BS,
                attention_mask=batch.attention_mask_BS,
                output_hidden_states=True,
            )
            hidden_BSD = output.hidden_states[layer + 1]
            n_tokens += int(hidden_BSD[batch.keep_BS].shape[0])
    return n_tokens / (time.perf_counter() - started)


def extractor_tokens_per_second(extractor, texts):
    extractor.transform(texts)
    return extractor.tokens_per_second_


def tiny_model_dir():
    import tempfile

    folder = tempfile.mkdtemp()
    texts = [text.lower() for text in corpora.pydoc_texts()[:20]]
    save_character_llama(folder, texts, n_layers=8, hidden_size=64)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--tokens", type=int, default=8192, help="approximate tokens per run")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few tokens")
    args = parser.parse_args()

    if args.quick:
        model, name, layers, n_chars = tiny_model_dir(), "tiny-llama", [1, 6], 4000
    else:
        try:
            model, name, layers = corpora.smollm2_path(), "SmolLM2-135M", [6, 15]
        except ImportError:
            model, name, layers = corpora.minilm_path(), "all-MiniLM-L6-v2", [1, 3]
        n_chars = args.tokens * 4  # ~4 characters per BPE token of English
    layers = args.layers or layers
    texts, total = [], 0
    for text in corpora.pydoc_texts():
        texts.append(text)
        total += len(text)
        if total >= n_chars:
            break

    print(
        f"model {name}; torch threads {torch.get_num_threads()}; "
        f"batches of {args.batch_size} x {args.context_size} tokens; median of {args.repeats}"
    )
    print(f"{'layer':>5} {'extractor tok/s':>16} {'full forward tok/s':>19} {'ratio':>6}")
    for layer in layers:
        extractor = ActivationExtractor(
            model,
            layer=layer,
            context_size=args.context_size,
            batch_size=args.batch_size,
            device=args.device,
        )
        extractor.transform(texts[:1])  # load and warm up
        ours, plain = [], []
        for _ in range(args.repeats):  # alternate, so background load hits both alike
            ours.append(extractor_tokens_per_second(extractor, texts))
            plain.append(plain_forward_tokens_per_second(extractor, texts, layer))
        ratio = statistics.median(ours) / statistics.median(plain)
        print(
            f"{layer:>5} {statistics.median(ours):>16.0f} {statistics.median(plain):>19.0f} "
            f"{ratio:>6.2f}"
        )
        np.testing.assert_array_equal(
            extractor.transform(texts[:1]).shape[1:], (extractor.model_.config.hidden_size,)
        )


if __name__ == "__main__":
    main()
