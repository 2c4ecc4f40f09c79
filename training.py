"""The parts of contrastive training that are not the loop: the loss and its false-negative masks, the pairs and
their batches, atomic model folders and checkpoints with their model card, uploads to the Hub, the best-model
record. `train.py` is the loop.
"""

import concurrent.futures
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from huggingface_hub import HfApi
from torch.utils.data import DataLoader

from data.loading import DatasetError
from defaults import local_copy

BASE_METRICS = ("f1_max", "roc_auc", "average_precision")

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
        self.guide = None  # unit vectors of every text by a guide model, see set_guide
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

    def set_guide(self, vectors: torch.Tensor):
        """Guided false-negative filtering (GISTEmbed, Solatorio 2024): with a guide model's vector of every text id,
        candidates the guide scores above the anchor's own positive are also left out of the loss, as likely
        unlabelled positives."""
        self.guide = F.normalize(vectors.float(), dim=-1)

    def _false(self, anchors, positives, candidates):
        same_text = (candidates[None, :] == anchors[:, None]) | (candidates[None, :] == positives[:, None])
        keys = anchors[:, None] * self.num_texts + candidates[None, :]
        false = same_text | torch.isin(keys, self.positive_keys.to(keys.device))
        if self.guide is not None:
            guide = self.guide.to(anchors.device)
            positive_score = (guide[anchors] * guide[positives]).sum(-1, keepdim=True)
            false |= guide[anchors] @ guide[candidates].T > positive_score
        return false


# ------------------------------------------------------------------------------------------------ pairs and batches


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


def train_dataloader(train_pairs, model, tokenizer, args, num_processes: int, stems=None) -> DataLoader:
    collate = make_collate(model, tokenizer, args.max_seq_length, stems)
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


def make_collate(model, tokenizer, max_seq_length: int, stems=None):
    """Batches of pairs: each side tokenized with its domain token, or, with `stems` (StemStates), the stored stem
    states of its (domain, text) rows."""
    tokens = model.config.domain_tokens

    def collate(rows):
        def encode(texts, domain_ids):
            if stems is not None:
                return stems.batch(list(zip(domain_ids, texts)))
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


# ------------------------------------------------------------------------------------------------ saving


MODEL_FILES = ".model-files.json"  # which entries of a folder are the model saved there; the rest is kept


def save_model(model, tokenizer, folder: Path, card: dict) -> list[str]:
    """Write a folder loadable with AutoModel.from_pretrained(folder, trust_remote_code=True), plus
    `experts/<DOMAIN>.safetensors` per domain (for `model.load_expert`). The model is written in full beside the
    folder, then swapped in as a whole (`install_model`); returns the model's files."""
    recover_folder(folder)  # before the temporary folder is reused
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model.config.num_experts > 1:  # each domain's experts alone, to download only the domains one needs
            for domain in model.config.domains:
                model.save_expert(domain, tmp / "experts" / f"{domain}.safetensors")
        (tmp / "training_state.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(model_card(card, model.config))
    except OSError:  # a full disk: give back what the half-written copy took
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return install_model(tmp, folder)


def copy_model(source: Path, folder: Path) -> list[str]:
    """Make a saved model folder the model of `folder`, swapped in as a whole like save_model."""
    recover_folder(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(MODEL_FILES))
    return install_model(tmp, folder)


def install_model(tmp: Path, folder: Path) -> list[str]:
    """Make the complete model in `tmp` the model in `folder`, in one swap of folders. What else `folder` holds
    (checkpoints, best_model/, stored stem states, uploads under way) is hard-linked into `tmp` first; the files of
    the model it held before are not. A kill at any point leaves `folder` holding the old model or the new one,
    never a mix (see replace_folder). Returns the model's files, relative to `folder`."""
    files = [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()]
    model_entries = {Path(f).parts[0] for f in files} | {MODEL_FILES}
    if (folder / MODEL_FILES).is_file():
        model_entries |= {Path(f).parts[0] for f in json.loads((folder / MODEL_FILES).read_text())}
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name not in model_entries and not entry.name.startswith((".tmp-", ".old-")):
                link_tree(entry, tmp / entry.name)
    (tmp / MODEL_FILES).write_text(json.dumps(files) + "\n")
    replace_folder(tmp, folder)
    return files


def link_tree(source: Path, target: Path):
    """Hard links to every file under `source` (a copy where links cannot be made); files deleted meanwhile (an
    upload snapshot removed when sent) are skipped."""
    entries = [source] if not source.is_dir() or source.is_symlink() else sorted(source.rglob("*"))
    for entry in entries:
        destination = target / entry.relative_to(source) if entry != source else target
        try:
            if entry.is_symlink():
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(entry), destination)
            elif entry.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(entry, destination)
        except FileNotFoundError:
            continue


CARD_TEMPLATE = """
# {model_name}

A MoE-BERT sentence encoder: the feed-forward blocks of {base} ({layers}) copied into one
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
{calibration}
## Training

{step} steps on: {datasets}. Validation (step {metrics_step}), {validation}.
{selection}

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
    selection = ""
    if card.get("expert_selection"):
        chosen = card["expert_selection"]
        kept = ", ".join(f"{d}: step {b['step']} ({b['value']:.4f})" for d, b in chosen["kept"].items())
        selection = (
            f"\nEach domain keeps its expert from the evaluation that scored best on its own valid pairs (valid "
            f"{chosen['metric']} in brackets; step 0 is the base's untrained feed-forward block): {kept}.\n"
        )
    calibration = ""
    if (getattr(config, "calibration", None) or {}).get("parameters"):
        calibration = (
            "\nCo-citation probabilities: `model.cocitation_probability(cosine, \"DOMAIN\")` maps a cosine to the "
            "probability that the two texts are co-cited, per domain (Platt scaling fitted on the valid pairs, co-cited "
            "and random in equal numbers), so one threshold means the same in every domain.\n"
        )
    text = CARD_TEMPLATE.format(
        model_name=name, base=f"[{base}](https://huggingface.co/{base})" if is_hub_id(base or "") else f"`{base}`", repo=card["args"].get("hub_model_id") or name, domains=", ".join(card["domains"]),
        domain=card["domains"][0], step=card["step"], datasets=card["datasets"], metrics_step=metrics.get("step", card["step"]),
        layers="every layer" if len(config.moe_layers) == config.num_hidden_layers else
        f"layer{'s' if len(config.moe_layers) > 1 else ''} {', '.join(map(str, config.moe_layers))} of {config.num_hidden_layers}",
        validation=validation, selection=selection, calibration=calibration, args=json.dumps(card["args"], indent=2, default=str),
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
    """Move the complete folder `new` to `final`, replacing a folder already there: the old one is renamed aside
    (`.old-NAME`), the new one renamed in, the old one deleted. A kill between the two renames leaves no `final` but
    both complete folders, and `recover_folder` (run before every save and when train.py starts) puts the new one
    in place: `final` is only ever the complete old or the complete new folder."""
    recover_folder(final)
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: Path) -> bool:
    """Finish a folder swap that a kill cut between its two renames; returns whether there was one to finish."""
    old, new = final.with_name(f".old-{final.name}"), final.with_name(f".tmp-{final.name}")
    if final.exists() or not old.exists():
        return False
    os.replace(new if new.exists() else old, final)  # `new` was complete before `old` was moved aside
    return True


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
        self.in_flight = []  # (future, snapshot) of every push not known to be finished

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
        self.in_flight.append(self.uploads[path_in_repo])
        self.remove_stale_snapshots()

    def remove_stale_snapshots(self):
        """Delete what the staging folder holds beyond the snapshots of unfinished uploads. A save of the output
        folder hard-links the snapshots under way into the new folder (install_model); one whose upload ends between
        that link and the swap comes back as a copy nobody removes."""
        self.in_flight = [(future, snapshot) for future, snapshot in self.in_flight if not future.done()]
        needed = {snapshot for _, snapshot in self.in_flight}
        for entry in sorted(self.staging_dir.iterdir()) if self.staging_dir.is_dir() else []:
            if entry not in needed:
                shutil.rmtree(entry, ignore_errors=True)

    def close(self, timeout: float | None = None) -> tuple[list[str], int]:
        """Wait for the uploads (at most `timeout` seconds in all); returns the failures (already reported) and the
        number of pushes still under way."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = 0
        for future, _ in self.uploads.values():  # the newest per folder; those before it ran first (one worker)
            try:
                future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                pending += 1
        self.remove_stale_snapshots()
        return self.failed, pending

    def finish(self, completed: bool = True, timeout: float | None = None) -> int:
        """Wait for the queued uploads and say how it went: "pushed" only when training completed and every push
        arrived. Returns the number of uploads abandoned after `timeout` seconds."""
        print(f"waiting for the uploads to the Hub repo {self.repo_id} ...", flush=True)
        failed, pending = self.close(timeout)
        if failed:
            print(f"{len(failed)} pushes to {self.repo_id} did not arrive (warnings above): "
                  f"{', '.join(repr(m) for m in failed)}", file=sys.stderr, flush=True)
        if pending:
            print(f"{pending} uploads to {self.repo_id} were still under way after {timeout:g} s and are abandoned; "
                  "the local files are intact", file=sys.stderr, flush=True)
        if failed or pending:
            return pending
        if completed:
            print(f"pushed to {self.api.endpoint}/{self.repo_id}")
        else:
            print(f"the uploads queued before training stopped arrived at {self.api.endpoint}/{self.repo_id}; the final "
                  "model was not pushed", flush=True)
        return 0

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
                    f"warning: pushing '{message}' to the Hub repo {where} failed {attempt} times "
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


# ------------------------------------------------------------------------------------------------ validation


class ShardedEncoder:
    """Every process encodes its share of the texts (every num_processes-th one) and all of them get every vector:
    validation keeps all processes working in step, rather than leaving the others in a barrier that a long
    validation would run into its timeout."""

    def __init__(self, encoder, accelerator: Accelerator):
        self.encoder, self.accelerator = encoder, accelerator

    def fit(self, train_texts):
        pass

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shares = gather_object([self.encoder.encode(texts[rank::world], domain)])
        vectors = np.zeros((len(texts), shares[0].shape[1]), dtype=np.float32)
        for process, share in enumerate(shares):
            vectors[process::world] = share
        return vectors


# ------------------------------------------------------------------------------------------------ best model


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


class BestExperts:
    """Per-domain selection: each domain's expert as it was at the evaluation that scored best on that domain's own
    valid metric, the untrained start included. When training changes the experts alone, a domain's valid score
    depends on its own expert only, so the model assembled from these snapshots scores each domain's best."""

    def __init__(self, metric: str):
        self.metric = metric.removeprefix("pooled_")  # a pooled metric has no per-domain value: its per-domain form
        self.best = {}  # domain -> {"value", "step"}
        self.experts = {}  # domain -> that expert's tensors (dense BERT names), on the CPU

    def update(self, model, results: dict, step: int) -> list[str]:
        """Snapshot the experts of the domains that just scored their best; returns those domains."""
        improved = []
        for index, domain in enumerate(model.config.domains):
            value = results.get(domain, {}).get(self.metric)
            if value is not None and value > self.best.get(domain, {}).get("value", -math.inf):
                self.best[domain] = {"value": value, "step": step}
                expert = model.expert_state(model.config.expert_of_domain(index))
                self.experts[domain] = {k: v.detach().to("cpu", copy=True) for k, v in expert.items()}
                improved.append(domain)
        return improved

    def assemble(self, model):
        """Load every domain's best expert into `model`."""
        for domain, expert in self.experts.items():
            model.load_expert_state(model.config.expert_of_domain(model.config.domain_index(domain)), expert)

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "experts": self.experts}

    def load_state_dict(self, state: dict):
        self.best, self.experts = state["best"], state["experts"]
