"""The encoder interface: texts of one domain in, one vector per text out. Training (valid scores), evaluation, search
and the benchmarks all encode through it; a MoE-BERT routes each text to its domain's expert, other models ignore the
domain. `embed` serves a mixed list of texts and domains through any encoder.
"""

import numpy as np
from tqdm.auto import tqdm


class UnknownDomainError(ValueError):
    """A domain the model has no expert for; the message names the ones it has."""


class Encoder:
    """`encode(texts, domain) -> float32 array (len(texts), dimension)`; `fit(train_texts)` for encoders that learn
    from the domain's train texts. A MoE-BERT encoder (`routes_by_domain`) has the model's `config` (domains,
    calibration) and gives calibrated co-citation probabilities."""

    routes_by_domain = False
    config = None
    device = "cpu"

    def fit(self, train_texts: list[str]):
        """Nothing to learn for a pretrained encoder."""

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        raise NotImplementedError

    def cocitation_probability(self, cosine: float, domain: str) -> float:
        """The model's calibrated probability that two texts of `domain` with this cosine are co-cited (the map its
        config holds)."""
        return float(self.config.cocitation_probability(cosine, domain))


def encode_in_batches(texts: list[str], batch_size: int, dimension: int, description: str, run, lengths=None):
    """The vectors of `texts` in their order, computed `batch_size` at a time by `run(batch_texts) -> array`,
    longest first (by `lengths`, default the characters): similar lengths share a batch, so little padding."""
    order = np.argsort([-n for n in (lengths or map(len, texts))], kind="stable")
    vectors = np.zeros((len(texts), dimension), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=description, unit="batch", leave=False):
        index = order[start : start + batch_size]
        vectors[index] = run([texts[i] for i in index])
    return vectors


def normalise(vectors):
    """Unit-length rows; sparse TF-IDF rows (already unit length) as CSR."""
    if hasattr(vectors, "multiply"):
        return vectors.tocsr()
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def embed(encoder: Encoder, texts: list[str], domains: list[str]) -> np.ndarray:
    """Unit vectors, each text through its own domain's expert (encoders without experts, such as TF-IDF or
    sentence-transformers ones, ignore the domain); a (text, domain) seen twice is encoded once."""
    if encoder.routes_by_domain:
        model_domains = encoder.config.domains
        unknown = sorted(set(domains) - set(model_domains))
        if unknown:
            raise UnknownDomainError(f"domain {unknown[0]!r} is not one of the model's domains {model_domains}.")
    vectors = np.zeros((len(texts), 0), dtype=np.float32)
    for domain in sorted(set(domains)):
        rows = [i for i, d in enumerate(domains) if d == domain]
        unique = sorted({texts[i] for i in rows})
        encoded = encoder.encode(unique, domain)
        encoded = encoded.toarray() if hasattr(encoded, "toarray") else encoded  # sparse TF-IDF rows
        if not vectors.shape[1]:
            vectors = np.zeros((len(texts), encoded.shape[1]), dtype=np.float32)
        position = {text: j for j, text in enumerate(unique)}
        vectors[rows] = encoded[[position[texts[i]] for i in rows]]
    return normalise(vectors)
