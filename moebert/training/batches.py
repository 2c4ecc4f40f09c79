"""Training pairs and their batches: the positive pairs of every domain with their text ids and hard negatives,
the sampler that keeps a global batch within one domain, and the collation into model inputs.
"""

import numpy as np
import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from moebert.data.pairs import DatasetError
from moebert.training.losses import KnownPairs

logger = get_logger(__name__)  # once, from the main process


def training_pairs(datasets: dict, domains: list[str], hard_negatives: int = 0, seed: int = 0):
    """The positive train pairs of every domain, with the domain id and text ids (and `hard_negatives` texts and
    ids per pair, in columns `hard`, `id_hard`); and their KnownPairs."""
    from datasets import concatenate_datasets

    parts = []
    for domain, dataset in datasets.items():
        positives = dataset["train"].filter(lambda label: label == 1, input_columns="label")
        if len(positives) == 0:
            raise DatasetError(f"domain {domain}: the train split has no positive (label 1) pair to train on.")
        parts.append(positives.select_columns(["a", "b"]).add_column("domain_id", [domains.index(domain)] * len(positives)))
    pairs = concatenate_datasets(parts)
    known = KnownPairs(pairs["a"], pairs["b"])
    pairs = pairs.add_column("id_a", known.ids_a).add_column("id_b", known.ids_b)
    if hard_negatives:
        texts = {i: t for t, i in zip(list(pairs["a"]) + list(pairs["b"]), known.ids_a + known.ids_b)}
        hard, short = draw_hard_negatives(known, [domains[i] for i in pairs["domain_id"]], hard_negatives, seed)
        for domain, pairs_short in short.items():
            logger.info(f"domain {domain}: {pairs_short} train pairs have fewer than {hard_negatives} texts co-cited "
                        "with neither of theirs; their other hard-negative slots are left out of the loss")
        pairs = pairs.add_column("id_hard", hard).add_column("hard", [[texts[i] for i in ids] for ids in hard])
    return pairs, known


def draw_hard_negatives(known: KnownPairs, domains: list[str], count: int, seed: int) -> tuple[list[list[int]], dict]:
    """For each pair, `count` text ids of its domain's train texts that are neither of its texts nor co-cited
    with either (drawn once, by `seed`). In a dense domain a pair may have fewer: its other slots take random
    texts of the domain, which the false-negative masks leave out of the loss. Also returns {domain: pairs
    short of true hard negatives}."""
    rng = np.random.default_rng(seed)
    partners = known.partners()
    texts_of = {}
    for d, a, b in zip(domains, known.ids_a, known.ids_b):
        texts_of.setdefault(d, set()).update((a, b))
    texts_of = {d: np.array(sorted(t)) for d, t in texts_of.items()}
    drawn, short = [], {}
    for d, a, b in zip(domains, known.ids_a, known.ids_b):
        excluded = partners[a] | partners[b] | {a, b}
        pool = texts_of[d]
        chosen = [int(t) for t in rng.choice(pool, size=min(len(pool), 4 * count + 8), replace=False) if t not in excluded]
        if len(chosen) < count:  # a dense domain: look through all of it
            chosen = [int(t) for t in rng.permutation(pool) if t not in excluded]
        if len(chosen) < count:
            short[d] = short.get(d, 0) + 1
            chosen += rng.choice(pool, size=count - len(chosen)).tolist()  # masked as false negatives
        drawn.append(chosen[:count])
    return drawn, short


class DomainBatchSampler(torch.utils.data.Sampler):
    """Batches whose pairs all come from one domain, so the in-batch negatives are abstracts of the same domain.

    With P processes, a global batch of P * batch_size pairs is drawn from one domain and handed out as P
    consecutive batches; Accelerate gives batch i to process i % P, so the gathered negatives stay in one domain.
    The order depends only on (seed, epoch): a resumed run sees the same batches.

    `alpha` sets each domain's share of an epoch's batches to its train pairs to the power alpha (temperature
    sampling, as multilingual models balance languages): 1 gives every pair once an epoch; below 1 the small domains
    get more batches, their pairs repeated in fresh orders, and the large ones fewer. The epoch keeps its length.
    """

    def __init__(self, domain_ids, batch_size: int, num_processes: int, seed: int, alpha: float = 1.0):
        domain_ids = np.asarray(domain_ids)
        self.groups = [np.flatnonzero(domain_ids == d) for d in np.unique(domain_ids)]
        self.num_processes, self.seed, self.epoch = num_processes, seed, 0
        # no fixed batch size: a small domain's batches are smaller. Accelerate then hands batch i to process i % P as
        # they come; with a size it would take a smaller batch for the last one, and processes would desync
        self.batch_size = None
        # a domain with fewer pairs than a global batch gives one smaller batch per epoch (a multiple of P)
        self.sizes = [min(len(g), batch_size * num_processes) // num_processes * num_processes for g in self.groups]
        small = {int(domain_ids[g[0]]): len(g) for g, size in zip(self.groups, self.sizes) if size < batch_size * num_processes}
        if small:
            logger.info(
                f"--batching domain: domain ids {list(small)} have fewer train pairs ({list(small.values())}) than one "
                f"global batch ({batch_size} x {num_processes} processes): each gives one smaller batch per epoch"
                + (", or none if it has fewer pairs than processes" if min(small.values()) < num_processes else "")
            )
        per_pass = [len(g) // size if size else 0 for g, size in zip(self.groups, self.sizes)]
        weights = np.array([len(g) ** alpha if n else 0.0 for g, n in zip(self.groups, per_pass)])
        # each domain's global batches per epoch; alpha 1 is one pass over every domain
        self.counts = per_pass if alpha == 1 else [max(1, round(sum(per_pass) * w / weights.sum())) if w else 0 for w in weights]

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return sum(self.counts) * self.num_processes

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        global_batches = []
        for group, size, count in zip(self.groups, self.sizes, self.counts):
            batches = []
            while len(batches) < count:  # a pass in a fresh order each time: no pair twice in one batch
                shuffled = rng.permutation(group)
                batches += [shuffled[i : i + size] for i in range(0, len(shuffled) - size + 1, size)]
            global_batches += batches[:count]
        for index in rng.permutation(len(global_batches)):
            for part in np.split(global_batches[index], self.num_processes):
                yield part.tolist()


def train_dataloader(train_pairs, collate, batching: str, batch_size: int, num_processes: int, seed: int,
                     alpha: float = 1.0) -> DataLoader:
    """`batching`: "domain" (every global batch from one domain, domains sampled by `alpha`) or "mixed"."""
    # its own generator: starting an epoch must not draw from the global RNG, which drives dropout, or a resumed
    # run (whose iterator starts after the RNG state is restored) would see other dropout masks
    generator = torch.Generator().manual_seed(seed)
    if batching == "domain":
        sampler = DomainBatchSampler(train_pairs["domain_id"], batch_size, num_processes, seed, alpha)
        return DataLoader(train_pairs, batch_sampler=sampler, collate_fn=collate, generator=generator)
    return DataLoader(
        train_pairs,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,  # equal batches on every process, for the gathered negatives
        generator=generator,
        collate_fn=collate,
    )


def make_collate(model, tokenizer, max_seq_length: int, stems=None):
    """Batches of pairs: each side tokenized with its domain token, or, with `stems` (StemStates), the stored stem
    states of its (domain, text) rows."""
    config = model.config

    def collate(rows):
        def encode(texts, domain_ids):
            if stems is not None:
                return stems.batch(list(zip(domain_ids, texts)))
            texts = [config.prepend_domain_token([t], config.domains[d])[0] for t, d in zip(texts, domain_ids)]
            return tokenizer(texts, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")

        domain_ids = [r["domain_id"] for r in rows]
        batch = {
            "a": encode([r["a"] for r in rows], domain_ids),
            "b": encode([r["b"] for r in rows], domain_ids),
            "domain_ids": torch.tensor(domain_ids),
            "id_a": torch.tensor([r["id_a"] for r in rows]),
            "id_b": torch.tensor([r["id_b"] for r in rows]),
        }
        if "hard" in rows[0]:  # k per pair, pair-major: rows i*k .. i*k+k-1 belong to pair i
            k = len(rows[0]["hard"])
            batch["hard"] = encode([t for r in rows for t in r["hard"]], [d for d in domain_ids for _ in range(k)])
            batch["hard_domain_ids"] = torch.tensor(domain_ids).repeat_interleave(k)
            batch["id_hard"] = torch.tensor([i for r in rows for i in r["id_hard"]])
        return batch

    return collate
