"""The contrastive loss: Multiple Negatives Ranking over the (global) batch, its false-negative masks, and the
training step that backpropagates it, plain or cached (GradCache) for batches larger than memory allows.
"""

import contextlib

import numpy as np
import torch
import torch.distributed.nn
import torch.nn.functional as F


def gather_with_grad(local: torch.Tensor, accelerator) -> torch.Tensor:
    """All processes' rows, in rank order, differentiable (torch.distributed.nn): every process's loss depends on
    every row, so the backward pass sums the gradients of all processes and each keeps its own rows' part. With DDP
    averaging the parameter gradients, the update is exactly that of one process on the global batch."""
    if accelerator is None or accelerator.num_processes == 1:
        return local
    return torch.cat(torch.distributed.nn.functional.all_gather(local))


def multiple_negatives_ranking_loss(emb_a, emb_b, scale: float, accelerator=None, ignore=None, emb_hard=None):
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

    def masks(self, ids_a: torch.Tensor, ids_b: torch.Tensor, accelerator=None, ids_hard=None):
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

    def partners(self) -> list[set[int]]:
        """The known co-cited partners of every text id."""
        partners = [set() for _ in range(self.num_texts)]
        for a, b in zip(self.ids_a, self.ids_b):
            partners[a].add(b)
            partners[b].add(a)
        return partners

    def _false(self, anchors, positives, candidates):
        same_text = (candidates[None, :] == anchors[:, None]) | (candidates[None, :] == positives[:, None])
        keys = anchors[:, None] * self.num_texts + candidates[None, :]
        return same_text | torch.isin(keys, self.positive_keys.to(keys.device))


# ------------------------------------------------------------------------------------------------ the step


def backward_step(model, batch, accelerator, known_pairs: KnownPairs | None, scale: float,
                  cached_mini_batch_size: int = 0) -> torch.Tensor:
    """The MNR loss of one batch (from moebert.training.batches), with its gradients accumulated into the model; false
    negatives left out when `known_pairs` is given. Returns the loss."""
    ignore = None
    if known_pairs is not None:
        ignore = known_pairs.masks(batch["id_a"], batch["id_b"], accelerator, batch.get("id_hard"))
    if 0 < cached_mini_batch_size < len(batch["domain_ids"]):
        return cached_backward_step(model, batch, accelerator, ignore, scale, cached_mini_batch_size)
    emb_a, emb_b, emb_hard = embed_sides(model, batch)
    loss = multiple_negatives_ranking_loss(emb_a, emb_b, scale, accelerator, ignore, emb_hard)
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


def cached_backward_step(model, batch, accelerator, ignore, scale: float, mini_batch_size: int) -> torch.Tensor:
    """GradCache (Gao et al., 2021): 1) embed every mini-batch without a graph, noting the RNG state before each;
    2) the loss on those embeddings gives d loss / d embedding; 3) each mini-batch is embedded again with a graph
    and the same dropout (RNG state restored), and backpropagated with that cached gradient. Memory: one
    mini-batch's activations; gradients: those of the whole batch at once."""
    chunks = torch.arange(len(batch["domain_ids"])).split(mini_batch_size)
    rng_states, embeddings = [], []
    with torch.no_grad():
        for rows in chunks:
            rng_states.append(rng_state(accelerator.device))
            embeddings.append(embed_sides(model, batch, rows))
    cached = [None if e[0] is None else torch.cat(e).float().requires_grad_() for e in zip(*embeddings)]
    loss = multiple_negatives_ranking_loss(*cached[:2], scale, accelerator, ignore, cached[2])
    loss.backward()  # only as far as the embeddings
    after = rng_state(accelerator.device)
    starts = np.cumsum([0] + [len(e[2]) if e[2] is not None else 0 for e in embeddings])
    for n, (rows, state) in enumerate(zip(chunks, rng_states)):
        set_rng_state(state, accelerator.device)
        last = n == len(chunks) - 1
        # gradients are all-reduced once, on the last mini-batch of a step that syncs
        with contextlib.nullcontext() if last and accelerator.sync_gradients else accelerator.no_sync(model):
            a, b, hard = embed_sides(model, batch, rows)
            surrogate = (a.float() * cached[0].grad[rows]).sum() + (b.float() * cached[1].grad[rows]).sum()
            if hard is not None:
                surrogate = surrogate + (hard.float() * cached[2].grad[starts[n] : starts[n + 1]]).sum()
            accelerator.backward(surrogate)
    set_rng_state(after, accelerator.device)
    return loss.detach()


def rng_state(device: torch.device) -> tuple:
    """The random state dropout draws from on `device`: the CPU's, and a CUDA device's own. A step on the CPU leaves
    CUDA alone, also where GPUs are visible (CPU processes on a GPU host would each open a context on every GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
