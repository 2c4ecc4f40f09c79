"""Contrastive training of MoE-BERT on co-cited abstract pairs, with Accelerate.

    python train.py                                   # embedded sample, embedded base model, 11 minutes on CPU
    accelerate launch train.py --recipe full          # the same data, all train pairs at 256 tokens: a GPU
    accelerate launch train.py --model_name_or_path allenai/scibert_scivocab_uncased \
        --dataset CVD=GleghornLab/abstract_domain_cvd --dataset COPD=GleghornLab/abstract_domain_copd \
        --per_device_train_batch_size 32 --mixed_precision bf16 --output_dir outputs/moebert

Each positive pair (a, b) of a domain gets the domain token in front of both texts and trains that domain's
expert with the Multiple Negatives Ranking loss: the other pairs of the batch are the negatives. With several
processes the embeddings of every process are gathered with their gradients, so each process scores its pairs
against the global batch and the update equals that of one process on the global batch.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed.nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from huggingface_hub import HfApi, constants
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, get_linear_schedule_with_warmup

from data.loading import SAMPLE_DIR, DatasetError, load_domain_datasets, parse_dataset_specs
from defaults import DEFAULT_BASE_MODEL_ID, default_base_model, local_copy
from modeling_moebert import MoEBertModel

DEFAULT_OUTPUT_DIR = "outputs/moebert"
BEST_MODEL_DIR = "best_model"
BASE_METRICS = ("f1_max", "roc_auc", "average_precision")
BEST_MODEL_METRICS = BASE_METRICS + tuple(f"pooled_{m}" for m in BASE_METRICS)
QUICK_STEPS = 150  # the default run's length: it fits 15 minutes on a 2-core CPU, evaluations included
# `--recipe full`: settings chosen on `valid` on an H100 (README, "The full recipe"); explicit flags still win
FULL_RECIPE = {
    "num_train_epochs": 1, "per_device_train_batch_size": 32, "max_seq_length": 256, "mixed_precision": "bf16",
    "train_experts_only": False, "learning_rate": 2e-5, "eval_steps": 100, "load_best_model_at_end": True,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe", default="quick", choices=["quick", "full"],
        help=f"quick: {QUICK_STEPS} steps at 128 tokens, experts only, for a CPU; full: all train pairs at 256 "
        "tokens, all weights, bf16, the best model on valid kept (" + ", ".join(f"{k}={v}" for k, v in FULL_RECIPE.items())
        + "), for a GPU; any flag given explicitly overrides the recipe's value",
    )
    parser.add_argument("--model_name_or_path", default=None, help="BERT to upcycle or a MoE-BERT checkpoint")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--moe_layers", default="all", help="all | middle | 0,5,11")
    parser.add_argument("--routing_mode", default="sentence", choices=["sentence", "token"])
    parser.add_argument("--shared_expert", action="store_true", help="one expert for all domains (baseline)")
    parser.add_argument(
        "--train_experts_only", action=argparse.BooleanOptionalAction, default=True,
        help="freeze the shared weights (embeddings, attention, LayerNorm): training a domain then changes only its "
        "own expert, so the other domains keep computing exactly what they did (--no-train_experts_only: train all)",
    )
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument(
        "--num_train_epochs", type=int, default=None,
        help=f"the full recipe: this many passes over the train pairs (with neither this nor --max_train_steps: "
        f"the quick default of {QUICK_STEPS} steps, about 11 minutes on a 2-core CPU)",
    )
    parser.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    parser.add_argument(
        "--per_device_train_batch_size", type=int, default=16,
        help="pairs per process and step; every other pair of the global batch is a negative "
        "(see --cached_mini_batch_size for large batches on small memory)",
    )
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument(
        "--batching", default="domain", choices=["mixed", "domain"],
        help="mixed: pairs of all domains in a batch; domain: every (global) batch from one domain, so the in-batch "
        "negatives are same-domain abstracts (harder)",
    )
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--scale", type=float, default=20.0, help="cosine similarity scale of the loss")
    parser.add_argument(
        "--cached_mini_batch_size", type=int, default=0,
        help="GradCache: embed the batch in mini-batches of this size and backpropagate through one at a time, so a "
        "large batch fits in the memory of a small one, with the same gradients (0: off, a plain step)",
    )
    parser.add_argument(
        "--hard_negatives", type=int, default=1,
        help="per pair, this many abstracts of the same domain's train split that are co-cited with neither text, as "
        "extra candidates of the loss (same-topic papers that are not co-cited: the negatives of the evaluation)",
    )
    parser.add_argument(
        "--mask_false_negatives", action=argparse.BooleanOptionalAction, default=True,
        help="leave out of the loss in-batch negatives that are the anchor's own text, its positive's text or a known "
        "co-cited partner",
    )
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass: less "
        "memory for large bases or long inputs, about a third more compute",
    )
    parser.add_argument(
        "--ddp_timeout", type=int, default=1800, help="seconds a collective may wait (several processes): the others "
        "wait while the main process scores valid, which takes longer on large valid sets and bases",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--eval_steps", type=int, default=None, help="evaluate on valid every N steps (always before training and at the end)"
    )
    parser.add_argument(
        "--metric_for_best_model", default="roc_auc", choices=BEST_MODEL_METRICS,
        help="valid metric that picks the model kept in OUTPUT_DIR/best_model: the mean over domains (each domain "
        "with its own threshold, as in the paper), or with pooled_ all domains' pairs together",
    )
    parser.add_argument("--load_best_model_at_end", action="store_true", help="the final model is the best one")
    parser.add_argument(
        "--early_stopping_patience", type=int, default=None, help="stop after N evaluations without improvement"
    )
    parser.add_argument("--checkpointing_steps", default=None, help="N or 'epoch'")
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help="PATH or 'latest'")
    parser.add_argument("--with_tracking", action="store_true")
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--push_to_hub", action="store_true", help="push the model to the Hub repo --hub_model_id")
    parser.add_argument("--hub_model_id", default=None, help="ORG/NAME")
    parser.add_argument(
        "--hub_strategy", default="every_save", choices=["end", "every_save", "checkpoint"],
        help="end: the final model only; every_save: also the model of each checkpoint; checkpoint: also the full "
        "training state of the latest checkpoint, under last-checkpoint/ (resume from it on another machine)",
    )
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--hub_token", default=None, help="default: the token saved by `hf auth login` or HF_TOKEN")
    if parser.parse_known_args(argv)[0].recipe == "full":
        parser.set_defaults(**FULL_RECIPE)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    if args.push_to_hub and constants.HF_HUB_OFFLINE:
        parser.error("--push_to_hub needs the network, but HF_HUB_OFFLINE is set: unset it or drop --push_to_hub")
    return args


# ------------------------------------------------------------------------------------------------ loss


def gather_with_grad(local: torch.Tensor, accelerator: Accelerator | None) -> torch.Tensor:
    """All processes' rows, in rank order, differentiable (torch.distributed.nn): every process's loss depends on
    every row, so the backward pass sums the gradients of all processes and each keeps its own rows' part. With DDP
    averaging the parameter gradients, the update is exactly that of one process on the global batch."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    return torch.cat(torch.distributed.nn.functional.all_gather(local))


def multiple_negatives_ranking_loss(
    emb_a, emb_b, scale: float, accelerator: Accelerator | None = None, ignore=None, emb_hard=None
):
    """Symmetric MNR loss: each a_i must pick b_i among all b of the (global) batch, and each b_i its a_i.

    `emb_hard`: optional hard negatives (local batch * k rows), extra candidates for every a (as in
    sentence-transformers' symmetric MNR loss, the b -> a direction has none).
    `ignore`: optional boolean masks (a_to_b, b_to_a), shape (local batch, global batch [+ global hard]), of
    candidates to leave out of the softmax (false negatives: see KnownPairs)."""
    emb_a, emb_b = F.normalize(emb_a, dim=-1), F.normalize(emb_b, dim=-1)
    all_a, all_b = gather_with_grad(emb_a, accelerator), gather_with_grad(emb_b, accelerator)
    if emb_hard is not None:
        all_b = torch.cat([all_b, gather_with_grad(F.normalize(emb_hard, dim=-1), accelerator)])
    offset = accelerator.process_index * emb_a.shape[0] if accelerator else 0
    targets = torch.arange(emb_a.shape[0], device=emb_a.device) + offset
    a_to_b, b_to_a = scale * emb_a @ all_b.T, scale * emb_b @ all_a.T
    if ignore is not None:
        a_to_b, b_to_a = a_to_b.masked_fill(ignore[0], -torch.inf), b_to_a.masked_fill(ignore[1], -torch.inf)
    return (F.cross_entropy(a_to_b, targets) + F.cross_entropy(b_to_a, targets)) / 2


class KnownPairs:
    """Integer ids for the training texts and the set of their co-cited pairs.

    With clique-like co-citation graphs, the "negatives" of a batch are often the same abstract as the anchor or
    its positive (one paper sits in many pairs), or another known positive of the anchor. Pushing those away
    fights the positives' pull; they are left out of the softmax instead."""

    def __init__(self, texts_a: list[str], texts_b: list[str]):
        index = {}
        self.ids_a = [index.setdefault(t, len(index)) for t in texts_a]
        self.ids_b = [index.setdefault(t, len(index)) for t in texts_b]
        self.num_texts = len(index)
        pairs = torch.tensor([self.ids_a, self.ids_b], dtype=torch.long)
        keys = torch.cat([pairs[0] * self.num_texts + pairs[1], pairs[1] * self.num_texts + pairs[0]])
        self.positive_keys = torch.unique(keys)  # sorted

    def masks(self, ids_a: torch.Tensor, ids_b: torch.Tensor, accelerator: Accelerator | None = None, ids_hard=None):
        """The (a_to_b, b_to_a) masks of false negatives for this process's pairs against the global batch (and,
        for a_to_b, the global batch's hard negatives after it)."""
        all_a = accelerator.gather(ids_a) if accelerator else ids_a
        all_b = accelerator.gather(ids_b) if accelerator else ids_b
        offset = accelerator.process_index * ids_a.shape[0] if accelerator else 0
        own = torch.zeros(ids_a.shape[0], all_a.shape[0], dtype=torch.bool, device=ids_a.device)
        own[torch.arange(ids_a.shape[0]), torch.arange(ids_a.shape[0]) + offset] = True
        a_to_b = self._false(ids_a, ids_b, all_b) & ~own
        if ids_hard is not None:
            all_hard = accelerator.gather(ids_hard) if accelerator else ids_hard
            a_to_b = torch.cat([a_to_b, self._false(ids_a, ids_b, all_hard)], dim=1)
        return a_to_b, self._false(ids_b, ids_a, all_a) & ~own

    def hard_negatives(self, domains: list[str], count: int, seed: int) -> tuple[list[list[int]], dict]:
        """For each pair, `count` text ids of its domain's train texts that are neither of its texts nor co-cited
        with either (drawn once, by `seed`). In a dense domain a pair may have fewer: its other slots take random
        texts of the domain, which the false-negative masks leave out of the loss. Also returns {domain: pairs
        short of true hard negatives}."""
        rng = np.random.default_rng(seed)
        partners = [set() for _ in range(self.num_texts)]
        for a, b in zip(self.ids_a, self.ids_b):
            partners[a].add(b)
            partners[b].add(a)
        texts_of = {}
        for d, a, b in zip(domains, self.ids_a, self.ids_b):
            texts_of.setdefault(d, set()).update((a, b))
        texts_of = {d: np.array(sorted(t)) for d, t in texts_of.items()}
        drawn, short = [], {}
        for d, a, b in zip(domains, self.ids_a, self.ids_b):
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

    def _false(self, anchors, positives, candidates):
        same_text = (candidates[None, :] == anchors[:, None]) | (candidates[None, :] == positives[:, None])
        keys = anchors[:, None] * self.num_texts + candidates[None, :]
        return same_text | torch.isin(keys, self.positive_keys.to(keys.device))


# ------------------------------------------------------------------------------------------------ model and data


def load_model(args, domains: list[str]):
    path = args.model_name_or_path or default_base_model()
    config, _ = PretrainedConfig.get_config_dict(path)  # local folder or Hub id
    if config.get("model_type") == "moebert":
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        for domain in domains:
            if domain not in model.config.domains:  # a new expert starts from the base's feed-forward blocks
                model.add_domain(domain, tokenizer, init_from=local_copy(model.config.base_model_name_or_path))
        return model, tokenizer
    model, tokenizer = MoEBertModel.from_bert(
        path,
        domains=domains,
        moe_layers=args.moe_layers,
        routing_mode=args.routing_mode,
        num_experts=1 if args.shared_expert else None,
    )
    if args.model_name_or_path is None:  # the published config names the base by its Hub id, not a local folder
        model.config.base_model_name_or_path = DEFAULT_BASE_MODEL_ID
    return model, tokenizer


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
        hard, short = known.hard_negatives([domains[i] for i in pairs["domain_id"]], hard_negatives, seed)
        for domain, pairs_short in short.items():
            print(f"domain {domain}: {pairs_short} train pairs have fewer than {hard_negatives} texts co-cited with "
                  "neither of theirs; their other hard-negative slots are left out of the loss")
        pairs = pairs.add_column("id_hard", hard).add_column("hard", [[texts[i] for i in ids] for ids in hard])
    return pairs, known


class DomainBatchSampler(torch.utils.data.Sampler):
    """Batches whose pairs all come from one domain, so the in-batch negatives are abstracts of the same domain.

    With P processes, a global batch of P * batch_size pairs is drawn from one domain and handed out as P
    consecutive batches; Accelerate gives batch i to process i % P, so the gathered negatives stay in one domain.
    The order depends only on (seed, epoch): a resumed run sees the same batches.
    """

    def __init__(self, domain_ids, batch_size: int, num_processes: int, seed: int):
        domain_ids = np.asarray(domain_ids)
        self.groups = [np.flatnonzero(domain_ids == d) for d in np.unique(domain_ids)]
        self.batch_size, self.num_processes, self.seed, self.epoch = batch_size, num_processes, seed, 0
        # a domain with fewer pairs than a global batch gives one smaller batch per epoch (a multiple of P)
        self.sizes = [min(len(g), batch_size * num_processes) // num_processes * num_processes for g in self.groups]
        small = {int(domain_ids[g[0]]): len(g) for g, size in zip(self.groups, self.sizes) if size < batch_size * num_processes}
        if small:
            print(
                f"--batching domain: domain ids {list(small)} have fewer train pairs ({list(small.values())}) than one "
                f"global batch ({batch_size} x {num_processes} processes): each gives one smaller batch per epoch"
                + (", or none if it has fewer pairs than processes" if min(small.values()) < num_processes else "")
            )

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return sum(len(g) // size for g, size in zip(self.groups, self.sizes) if size) * self.num_processes

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        global_batches = []
        for group, size in zip(self.groups, self.sizes):
            shuffled = rng.permutation(group)
            global_batches += [shuffled[i : i + size] for i in range(0, len(shuffled) - size + 1, size)] if size else []
        for index in rng.permutation(len(global_batches)):
            for part in np.split(global_batches[index], self.num_processes):
                yield part.tolist()


def train_dataloader(train_pairs, model, tokenizer, args, num_processes: int) -> DataLoader:
    collate = make_collate(model, tokenizer, args.max_seq_length)
    # its own generator: starting an epoch must not draw from the global RNG, which drives dropout, or a resumed
    # run (whose iterator starts after the RNG state is restored) would see other dropout masks
    generator = torch.Generator().manual_seed(args.seed)
    if args.batching == "domain":
        sampler = DomainBatchSampler(train_pairs["domain_id"], args.per_device_train_batch_size, num_processes, args.seed)
        return DataLoader(train_pairs, batch_sampler=sampler, collate_fn=collate, generator=generator)
    return DataLoader(
        train_pairs,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,  # equal batches on every process, for the gathered negatives
        generator=generator,
        collate_fn=collate,
    )


def make_collate(model, tokenizer, max_seq_length: int):
    tokens = model.config.domain_tokens

    def collate(rows):
        def encode(texts, domain_ids):
            texts = [f"{tokens[d]} {t}" for t, d in zip(texts, domain_ids)]
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


def backward_step(model, batch, args, accelerator, known_pairs) -> torch.Tensor:
    """The MNR loss of one batch, with its gradients accumulated into the model; returns the loss."""
    ignore = None
    if args.mask_false_negatives:
        ignore = known_pairs.masks(batch["id_a"], batch["id_b"], accelerator, batch.get("id_hard"))
    if 0 < args.cached_mini_batch_size < len(batch["domain_ids"]):
        return cached_backward_step(model, batch, args, accelerator, ignore)
    emb_a, emb_b, emb_hard = embed_sides(model, batch)
    loss = multiple_negatives_ranking_loss(emb_a, emb_b, args.scale, accelerator, ignore, emb_hard)
    accelerator.backward(loss)
    return loss.detach()


def embed_sides(model, batch, rows=None) -> list:
    """Embeddings of the a, b (and hard negative) texts of the pairs `rows` (all by default): [a, b, hard|None]."""
    rows = torch.arange(len(batch["domain_ids"])) if rows is None else rows

    def embed(side, index, domain_ids):
        return model(**{k: v[index] for k, v in batch[side].items()}, domain_ids=domain_ids[index]).pooler_output

    sides = [embed(side, rows, batch["domain_ids"]) for side in ("a", "b")]
    if "hard" not in batch:
        return sides + [None]
    k = len(batch["hard_domain_ids"]) // len(batch["domain_ids"])
    hard_rows = (rows[:, None] * k + torch.arange(k)).flatten()
    return sides + [embed("hard", hard_rows, batch["hard_domain_ids"])]


def cached_backward_step(model, batch, args, accelerator, ignore) -> torch.Tensor:
    """GradCache (Gao et al., 2021): 1) embed every mini-batch without a graph, noting the RNG state before each;
    2) the loss on those embeddings gives d loss / d embedding; 3) each mini-batch is embedded again with a graph
    and the same dropout (RNG state restored), and backpropagated with that cached gradient. Memory: one
    mini-batch's activations; gradients: those of the whole batch at once."""
    chunks = torch.arange(len(batch["domain_ids"])).split(args.cached_mini_batch_size)
    rng_states, embeddings = [], []
    with torch.no_grad():
        for rows in chunks:
            rng_states.append(rng_state())
            embeddings.append(embed_sides(model, batch, rows))
    cached = [None if e[0] is None else torch.cat(e).float().requires_grad_() for e in zip(*embeddings)]
    loss = multiple_negatives_ranking_loss(*cached[:2], args.scale, accelerator, ignore, cached[2])
    loss.backward()  # only as far as the embeddings
    after = rng_state()
    starts = np.cumsum([0] + [len(e[2]) if e[2] is not None else 0 for e in embeddings])
    for n, (rows, state) in enumerate(zip(chunks, rng_states)):
        set_rng_state(state)
        last = n == len(chunks) - 1
        # gradients are all-reduced once, on the last mini-batch of a step that syncs
        with contextlib.nullcontext() if last and accelerator.sync_gradients else accelerator.no_sync(model):
            a, b, hard = embed_sides(model, batch, rows)
            surrogate = (a.float() * cached[0].grad[rows]).sum() + (b.float() * cached[1].grad[rows]).sum()
            if hard is not None:
                surrogate = surrogate + (hard.float() * cached[2].grad[starts[n] : starts[n + 1]]).sum()
            accelerator.backward(surrogate)
    set_rng_state(after)
    return loss.detach()


def rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def set_rng_state(state: tuple):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def experts_can_miss_a_step(model) -> bool:
    """Whether a trained parameter can get no gradient in a step (an expert no token of the batch was routed to):
    only then must DDP search the graph for unused parameters, which costs every step."""
    return model.config.num_experts > 1 and any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)


def make_optimizer(model, args) -> torch.optim.AdamW:
    if args.train_experts_only:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".experts." in name
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in trained if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in trained if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate)


# ------------------------------------------------------------------------------------------------ evaluation, saving


def evaluate(model, tokenizer, datasets, args) -> dict:
    from eval import TransformerEncoder, evaluate_model

    model.eval()
    encoder = TransformerEncoder(model, tokenizer, args.max_seq_length, args.per_device_eval_batch_size)
    results, _ = evaluate_model(encoder, datasets, "valid")
    model.train()
    return results


def save_model(model, tokenizer, folder: Path, card: dict):
    """Write a folder loadable with AutoModel.from_pretrained(folder, trust_remote_code=True), plus
    `experts/<DOMAIN>.safetensors` per domain (for `model.load_expert`). Everything is
    written beside it first and then moved in file by file, so an interrupted save never leaves a half file, and
    other contents of the folder (checkpoints) stay."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if model.config.num_experts > 1:  # each domain's experts alone, to download only the domains one needs
        for domain in model.config.domains:
            model.save_expert(domain, tmp / "experts" / f"{domain}.safetensors")
    (tmp / "training_state.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (tmp / "README.md").write_text(model_card(card, model.config))
    return move_files_into(tmp, folder)


def copy_model(source: Path, folder: Path):
    """Copy a saved model folder over `folder`, with the same file-by-file atomicity as save_model."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    return move_files_into(tmp, folder)


def move_files_into(tmp: Path, folder: Path) -> list[str]:
    """Move every file of `tmp` to the same place under `folder`; returns their relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    moved = [entry.relative_to(tmp) for entry in sorted(tmp.rglob("*")) if entry.is_file()]
    for name in moved:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, folder / name)
    shutil.rmtree(tmp)
    return [str(name) for name in moved]


CARD_TEMPLATE = """
# {model_name}

A MoE-BERT sentence encoder: the feed-forward blocks of {base} copied into one
expert per domain and trained contrastively (multiple negatives ranking loss) on co-cited abstracts with
MoEBERT's `train.py`. Each text goes through its own domain's expert.

Domains: {domains}.

## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{repo}", trust_remote_code=True)
embeddings = model.encode(["First abstract ...", "Second abstract ..."], prompt_name="{domain}")
```

```python
import torch
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
texts = model.prepend_domain_token(["First abstract ...", "Second abstract ..."], "{domain}")
with torch.no_grad():
    embeddings = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).pooler_output
```

One domain's experts alone: `experts/<DOMAIN>.safetensors`, loaded with `model.load_expert(path, tokenizer=tokenizer)`.

## Training

{step} steps on: {datasets}. Validation (step {metrics_step}), {validation}.

<details><summary>Training arguments</summary>

```json
{args}
```
</details>

## Citation

Hallee et al., *Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings*, arXiv:2401.15713
(2024); Scientific Reports (2025).
"""


def model_card(card: dict, config) -> str:
    """The README of a saved model: Hub metadata (base model, licence, datasets, valid metrics as model-index)
    built with huggingface_hub's ModelCardData, then usage, training and citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics, base = card.get("metrics", {}), config.base_model_name_or_path
    name = Path(card["args"].get("hub_model_id") or card["args"]["output_dir"]).name
    results = [
        EvalResult(task_type="sentence-similarity", dataset_type=f"co-citation-{domain}", dataset_name=source,
                   dataset_config=domain, dataset_split="valid", metric_type=metric,
                   metric_value=round(metrics[domain][metric], 4))
        for domain, source in card["datasets"].items() if domain in metrics
        for metric in ("roc_auc", "f1_max") if metric in metrics[domain]
    ]
    data = ModelCardData(
        base_model=base, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        license=base_licence(base), datasets=[s.split(":")[0] for s in card["datasets"].values() if is_hub_id(s)] or None,
        tags=["moebert", "mixture-of-experts", "sentence-embeddings", "co-citation", "feature-extraction"],
        model_name=name, eval_results=results or None,
    )
    validation = "; ".join(
        f"{label}: " + ", ".join(f"{k} {metrics[key][k]:.4f}" for k in BASE_METRICS if k in metrics.get(key, {}))
        for key, label in (("mean", "mean over domains"), ("all", "pooled"))
    )
    text = CARD_TEMPLATE.format(
        model_name=name, base=f"[{base}](https://huggingface.co/{base})" if is_hub_id(base or "") else f"`{base}`", repo=card["args"].get("hub_model_id") or name, domains=", ".join(card["domains"]),
        domain=card["domains"][0], step=card["step"], datasets=card["datasets"], metrics_step=metrics.get("step", card["step"]),
        validation=validation, args=json.dumps(card["args"], indent=2, default=str),
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))


def is_hub_id(source: str) -> bool:
    return not Path(source.split(":")[0]).exists() and source.count("/") == 1 and not source.startswith((".", "/"))


@functools.lru_cache
def base_licence(base: str | None) -> str | None:
    """The licence in the base model's own card (local folder or Hub), else None."""
    from huggingface_hub import ModelCard

    try:
        folder = Path(local_copy(base) or "")
        card = ModelCard.load(folder / "README.md") if (folder / "README.md").is_file() else ModelCard.load(base)
        return card.data.license
    except Exception:  # no card, no network: the card then names no licence rather than a wrong one
        return None


def save_checkpoint(accelerator, model, tokenizer, output_dir: Path, step: int, card: dict, args, pusher=None):
    """`checkpoint-<step>/`: the full training state (accelerator.save_state) and a loadable `model/` folder,
    written under a temporary name and renamed when complete; only the newest `limit` are kept. Then, by
    --hub_strategy, the model goes to the root of the Hub repo and the whole checkpoint to last-checkpoint/."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        model_files = save_model(accelerator.unwrap_model(model), tokenizer, tmp / "model", card)
        replace_folder(tmp, final)
        if pusher and args.hub_strategy in ("every_save", "checkpoint"):
            pusher.push(final / "model", model_files, "", f"Training in progress, step {step}")
        if pusher and args.hub_strategy == "checkpoint":
            state_files = [str(p.relative_to(final)) for p in sorted(final.rglob("*")) if p.is_file()]
            pusher.push(final, state_files, "last-checkpoint", f"Checkpoint at step {step}")
        limit = args.checkpoints_total_limit
        for old in sorted(checkpoints(output_dir), key=checkpoint_step)[:-limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def resumed_step(path: Path) -> int:
    """The step a checkpoint folder was written at, by any name (`checkpoint-40`, the Hub's `last-checkpoint`)."""
    state = path / "model" / "training_state.json"
    if not state.is_file():
        raise SystemExit(
            f"error: --resume_from_checkpoint {path}: not a checkpoint written by train.py (no model/training_state.json); "
            "give a checkpoint-<step>/ folder, a downloaded last-checkpoint/, or 'latest'."
        )
    return int(json.loads(state.read_text())["step"])


def replace_folder(new: Path, final: Path):
    """Move `new` to `final`, replacing a folder already there (a rerun into the same output dir): the old one is
    renamed aside first, so at every moment `final` is either the complete old or the complete new folder."""
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ Hub


class HubPusher:
    """Uploads to one Hub model repo in the background (huggingface_hub's `run_as_future`: one upload at a time,
    in order), so training never waits on the network (and the other processes never wait on the main one).

    Each push uploads a snapshot: hard links to the files as they are when `push` is called, so the loop may go
    on rewriting and rotating checkpoints during the upload. A push to a repo folder whose previous push has not
    started yet replaces it: only the newest is sent. A push that still fails after `attempts` tries is reported
    as a warning; the local files are never touched.
    """

    def __init__(
        self, repo_id: str, staging_dir: Path, token=None, private=False, attempts: int = 3, backoff_s: float = 2.0
    ):
        self.api = HfApi(token=token)
        self.staging_dir = staging_dir
        self.repo_id, self.private, self.attempts, self.backoff_s = repo_id, private, attempts, backoff_s
        self.repo_ready, self.failed, self.snapshots = False, [], 0
        self.uploads = {}  # repo folder -> (future, snapshot) of its newest push

    def push(self, folder: Path, files: list[str], path_in_repo: str, message: str):
        """Upload `files` (paths relative to `folder`) into `path_in_repo` of the repo, in the background."""
        self.snapshots += 1
        snapshot = self.staging_dir / str(self.snapshots)
        try:
            for name in files:
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(folder / name, snapshot / name)
        except OSError as error:  # e.g. a full disk: skip this push, keep training
            shutil.rmtree(snapshot, ignore_errors=True)
            self.failed.append(message)
            print(f"warning: not pushing '{message}': cannot stage {folder} for upload ({error})", file=sys.stderr)
            return
        previous = self.uploads.get(path_in_repo)
        if previous and previous[0].cancel():  # still waiting: this newer snapshot supersedes it
            shutil.rmtree(previous[1], ignore_errors=True)
        self.uploads[path_in_repo] = (self.api.run_as_future(self._upload, snapshot, path_in_repo, message, folder), snapshot)

    def close(self) -> list[str]:
        """Wait for the uploads; returns the failures (already reported)."""
        for future, _ in self.uploads.values():
            future.result()  # the newest per folder; those before it ran first (one worker, in order)
        return self.failed

    def finish(self):
        """Wait for the queued uploads and say how it went: "pushed" only when every push arrived."""
        print(f"waiting for the uploads to the Hub repo {self.repo_id} ...", flush=True)
        failed = self.close()
        if failed:
            print(f"{len(failed)} pushes to {self.repo_id} did not arrive (warnings above): "
                  f"{', '.join(repr(m) for m in failed)}", file=sys.stderr, flush=True)
        else:
            print(f"pushed to {self.api.endpoint}/{self.repo_id}")

    def _upload(self, snapshot: Path, path_in_repo: str, message: str, local: Path):
        try:
            self._upload_with_retries(snapshot, path_in_repo, message, local)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _upload_with_retries(self, snapshot: Path, path_in_repo: str, message: str, local: Path):
        for attempt in range(1, self.attempts + 1):
            try:
                if not self.repo_ready:
                    self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                    self.repo_ready = True
                self.api.upload_folder(
                    repo_id=self.repo_id, folder_path=snapshot, path_in_repo=path_in_repo or None, commit_message=message
                )
                return
            except Exception as error:  # network, HTTP status, auth: all end in the same warning
                if attempt < self.attempts:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                    continue
                where = f"{self.repo_id}/{path_in_repo}" if path_in_repo else self.repo_id
                self.failed.append(message)
                print(
                    f"warning: pushing '{message}' to the Hub repo {where} failed {self.attempts} times "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The local copy in "
                    f"{local} is intact; upload it later with: hf upload {self.repo_id} {local} {path_in_repo or '.'}",
                    file=sys.stderr,
                    flush=True,
                )


def link_or_copy(source: Path, target: Path):
    try:
        os.link(source, target)  # the snapshot keeps the file's content even if the loop replaces or deletes it
    except OSError:
        shutil.copy2(source, target)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    tracking = {"log_with": args.report_to, "project_dir": args.output_dir} if args.with_tracking else {}
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # an expert that no token of this process's batch was routed to gets no gradient in that step
        kwargs_handlers=[
            DistributedDataParallelKwargs(),  # find_unused_parameters is set in train(), once the model is known
            # the other processes wait in a barrier while the main process scores valid
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
        ],
        **tracking,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # each process would train alone and overwrite the others' files
        raise SystemExit(
            f"error: {launched} processes were launched but Accelerate sees {accelerator.num_processes}. On a machine "
            "without GPUs, launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ..."
        )
    set_seed(args.seed)
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        staging = Path(args.output_dir) / ".hub-uploads"
        shutil.rmtree(staging, ignore_errors=True)  # snapshots left by a killed run
        pusher = HubPusher(args.hub_model_id, staging, token=args.hub_token, private=args.hub_private_repo)
    try:
        return train(args, accelerator, pusher)
    finally:  # also when training fails: what was queued is still sent, or reported
        if pusher:
            pusher.finish()


def train(args, accelerator: Accelerator, pusher: "HubPusher | None") -> dict:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    specs = parse_dataset_specs(args.dataset)
    try:
        datasets = load_domain_datasets(specs)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    model, tokenizer = load_model(args, list(specs))
    model.config.max_seq_length = args.max_seq_length  # sentence-transformers encodes at the training length
    domains = model.config.domains  # ids by the model's own order, whatever the order of --dataset flags
    try:
        train_pairs, known_pairs = training_pairs(datasets, domains, args.hard_negatives, args.seed)
        dataloader = train_dataloader(train_pairs, model, tokenizer, args, accelerator.num_processes)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    batch_sampler = dataloader.batch_sampler  # before prepare(), which may wrap it
    if args.gradient_checkpointing:  # recompute activations in the backward pass: less memory, more compute
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = make_optimizer(model, args)
    if accelerator.ddp_handler is not None:
        accelerator.ddp_handler.find_unused_parameters = experts_can_miss_a_step(model)
    updates_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or (args.num_train_epochs * updates_per_epoch if args.num_train_epochs else QUICK_STEPS)
    epochs = math.ceil(max_steps / max(updates_per_epoch, 1))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * max_steps) * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if args.with_tracking:
        accelerator.init_trackers("moebert", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    best = BestModel(args.metric_for_best_model, args.early_stopping_patience)
    accelerator.register_for_checkpointing(best)  # saved and restored with the rest of the training state
    step, start_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        found = checkpoints(output_dir)
        path = max(found, key=checkpoint_step) if args.resume_from_checkpoint == "latest" and found else None
        path = path or (Path(args.resume_from_checkpoint) if args.resume_from_checkpoint != "latest" else None)
        if path is not None:
            accelerator.print(f"resuming from {path}")
            step = resumed_step(path)
            accelerator.load_state(str(path))
            start_epoch = step // updates_per_epoch
            skip_batches = (step % updates_per_epoch) * args.gradient_accumulation_steps

    public_args = {k: v for k, v in vars(args).items() if k != "hub_token"}  # the card is published with the model
    # the card is published: the embedded sample by its place in this repository, not a local folder
    sources = specs if args.dataset else {d: f"data/{SAMPLE_DIR.name}/{d}" for d in specs}
    card = {"domains": domains, "datasets": sources, "args": public_args, "step": step, "metrics": {}}
    if step:  # the metrics as they were at the checkpoint
        card = {**json.loads((path / "model" / "training_state.json").read_text()), "args": public_args}
    else:
        evaluate_and_keep_best(accelerator, model, tokenizer, datasets, args, card, best)  # the untrained baseline
    last_evaluated, stop_early = step, False

    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training")
    model.train()
    for epoch in range(start_epoch, epochs):
        for sampler in (dataloader, batch_sampler):  # the same shuffle for each epoch in every run
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = backward_step(model, batch, args, accelerator, known_pairs)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            loss_value, lr = loss.item(), scheduler.get_last_lr()[0]  # one device sync per step
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if args.with_tracking:
                accelerator.log({"train/loss": loss_value, "train/lr": lr}, step=step)
            card["step"] = step
            if args.eval_steps and step % args.eval_steps == 0:
                evaluate_and_keep_best(accelerator, model, tokenizer, datasets, args, card, best)
                last_evaluated, stop_early = step, accelerator.check_trigger()
            if args.checkpointing_steps and args.checkpointing_steps.isdigit() and step % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args, pusher)
            if step >= max_steps or stop_early:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args, pusher)
        if step >= max_steps or stop_early:
            break
    progress.close()

    if last_evaluated != step:
        evaluate_and_keep_best(accelerator, model, tokenizer, datasets, args, card, best)
    if accelerator.is_main_process:
        if args.load_best_model_at_end and best.step not in (None, step):
            files = copy_model(output_dir / BEST_MODEL_DIR, output_dir)
            print(f"best model (step {best.step}, valid {best.metric} {best.value:.4f}) saved to {output_dir}/")
        else:
            files = save_model(accelerator.unwrap_model(model), tokenizer, output_dir, card)
            print(f"model saved to {output_dir}/")
        if pusher:
            pusher.push(output_dir, files, "", "End of training")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return card


class BestModel:
    """Which evaluation scored best on the pooled valid metric, and how many evaluations passed since."""

    def __init__(self, metric: str, patience: int | None):
        self.metric, self.patience = metric, patience
        self.value, self.step, self.stale = -math.inf, None, 0

    def update(self, results: dict, step: int) -> bool:
        pooled, name = self.metric.startswith("pooled_"), self.metric.removeprefix("pooled_")
        value = results.get("all" if pooled else "mean", {}).get(name)
        if value is not None and value > self.value:
            self.value, self.step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "stale": self.stale}

    def load_state_dict(self, state: dict):
        self.value, self.step, self.stale = state["value"], state["step"], state["stale"]


def evaluate_and_keep_best(accelerator, model, tokenizer, datasets, args, card: dict, best: BestModel):
    """Score valid on the main process; keep the best model in OUTPUT_DIR/best_model; tell every process when
    patience has run out (accelerator's trigger, so all of them stop at the same step)."""
    if accelerator.is_main_process:
        step = card["step"]
        card["metrics"] = {**evaluate(accelerator.unwrap_model(model), tokenizer, datasets, args), "step": step}
        summary = {
            f"{prefix}{name}": card["metrics"][key][name]
            for key, prefix in (("mean", ""), ("all", "pooled_"))
            for name in BASE_METRICS
            if name in card["metrics"].get(key, {})
        }
        print(f"step {step} valid: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        if args.with_tracking:
            accelerator.log({f"valid/{k}": v for k, v in summary.items()}, step=step)
        improved = best.update(card["metrics"], step)
        card["best"] = best.state_dict()
        if improved:
            save_model(accelerator.unwrap_model(model), tokenizer, Path(args.output_dir) / BEST_MODEL_DIR, card)
        elif best.should_stop():
            print(f"early stopping: no better valid {best.metric} in {best.stale} evaluations (best: step {best.step})")
            accelerator.set_trigger()
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
