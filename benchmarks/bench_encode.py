"""Texts per second of the path users call to embed a collection, against sentence-transformers, in one run.

    python benchmarks/bench_encode.py [--texts 2000] [--max_seq_length 256] [--batch_size 32]

Both sides embed the same SYNERGY abstracts (the first N shipped papers by id) with all-MiniLM-L6-v2 at the same
length: `SentenceTransformer(...).encode(texts, batch_size=32)` in fp32, and `search.embed` (the embedded model
upcycled into the SYNERGY domains, each text through its domain's expert, which at initialisation is the base) in
fp32 and under bf16 autocast. Prints texts/s, the ratio to sentence-transformers, the mean cosine of each vector to
sentence-transformers' (below 1: the MoE path reads the domain token, a [CLS] copy, in its mean), and the lowest
cosine of each bf16 vector to its fp32 twin.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defaults import default_base_model  # noqa: E402
from encoders import bf16_is_native  # noqa: E402
from search import EMBEDDED_MODEL, embed, load_encoder, shipped_papers  # noqa: E402


def timed(function) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    papers = shipped_papers().head(args.texts)
    texts, domains = papers["text"].tolist(), papers["domain"].tolist()
    print(f"{len(texts)} SYNERGY abstracts, {args.max_seq_length} tokens at most, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, bf16 native on this CPU: {bf16_is_native('cpu')}")

    reference_model = SentenceTransformer(default_base_model(), device="cpu")
    reference_model.max_seq_length = args.max_seq_length
    encoder, _, _ = load_encoder(EMBEDDED_MODEL, args.max_seq_length, args.batch_size, "cpu")
    warm = texts[:64]
    reference_model.encode(warm, batch_size=args.batch_size)
    embed(encoder, warm, domains[:64])

    rows = [("sentence-transformers encode, fp32", *timed(
        lambda: reference_model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)))]
    reference = rows[0][2]
    rows.append(("search.embed, fp32", *timed(lambda: embed(encoder, texts, domains))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows.append(("search.embed, bf16 autocast", *timed(lambda: embed(encoder, texts, domains))))

    fp32 = rows[1][2]
    print(f"\n{'':36} {'texts/s':>8} {'vs ST':>7} {'mean cos to ST':>15} {'min cos to fp32 embed':>22}")
    for name, seconds, vectors in rows:
        print(f"{name:36} {len(texts) / seconds:8.1f} {rows[0][1] / seconds:6.2f}x "
              f"{(vectors * reference).sum(axis=1).mean():15.4f} {(vectors * fp32).sum(axis=1).min():22.5f}")


if __name__ == "__main__":
    main()
