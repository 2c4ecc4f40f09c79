"""Frozen stem states, computed once per text and reused at every step and evaluation.

When training updates the experts alone, everything below the first MoE layer's experts (the embeddings, the dense
layers under it and its attention: the model's "stem") is frozen. Its output for a text then never changes, yet a
plain training step recomputes it for every text of every batch: with co-citation pairs, where one abstract sits in
dozens of pairs, each text again and again. Here it is computed once per (domain, text), in eval mode (no dropout,
so what is reused is exactly what a forward pass computes), stored as float32 rows in a memory-mapped `.npy` file,
and fed to `MoEBertModel.forward(stem_states=...)`.

The files live in a folder named by a SHA-256 over the stem's weights, the token ids of every stored input (so the
texts, the domain tokens, the tokenizer and the length) and the precision: a changed model, dataset or length gets
a new folder and can never read stale states. A folder appears complete or not at all (moebert.atomic).
"""

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moebert.atomic import writing_folder
from moebert.device import autocast

FORMAT = b"moebert-stem-states-v1"


class StemStates:
    """The stored stem states of a list of (domain id, text) inputs, looked up by that pair."""

    def __init__(self, folder: Path, inputs: list[tuple[int, str]]):
        self.folder = folder
        refusal = f"stem states in {folder} are cut short or do not match their inputs: delete the folder to rebuild it."
        try:
            # (tokens of all rows, hidden) float32, mapped copy-on-write: torch wants writable arrays, the file stays
            self.values = np.load(folder / "states.npy", mmap_mode="c")
            self.offsets = np.load(folder / "offsets.npy")  # row i is values[offsets[i]:offsets[i + 1]]
        except (OSError, ValueError):  # a file shorter than its header says: numpy cannot map or read it
            raise ValueError(refusal) from None
        if len(self.offsets) != len(inputs) + 1 or self.offsets[-1] != len(self.values):
            raise ValueError(refusal)
        self.row_of = {key: row for row, key in enumerate(inputs)}

    @classmethod
    def open_or_build(
        cls, model, tokenizer, inputs: list[tuple[int, str]], max_seq_length: int, cache_dir: Path,
        mixed_precision: str = "no", batch_size: int = 64, build: bool = True,
    ) -> "StemStates":
        """The states of `inputs` (domain id, text), from `cache_dir` when an identical stem already stored them,
        else computed now (when `build`; the other processes of a run wait for the main one, then open them).
        `mixed_precision` (no, fp16, bf16) is the autocast the training steps run under."""
        token_ids = tokenize(model, tokenizer, inputs, max_seq_length)
        folder = Path(cache_dir) / fingerprint(model, token_ids, mixed_precision)
        if build and not folder.is_dir():
            write_states(model, token_ids, folder, mixed_precision, batch_size)
        return cls(folder, inputs)

    def length(self, key: tuple[int, str]) -> int:
        row = self.row_of[key]
        return int(self.offsets[row + 1] - self.offsets[row])

    def batch(self, keys: list[tuple[int, str]]) -> dict:
        """`stem_states` and `attention_mask` for these (domain id, text) rows, padded to the longest."""
        rows = [self.row_of[key] for key in keys]
        lengths = [self.length(key) for key in keys]
        states = torch.zeros(len(rows), max(lengths), self.values.shape[1])
        mask = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            states[i, :length] = torch.from_numpy(self.values[self.offsets[row] : self.offsets[row + 1]])
            mask[i, :length] = 1
        return {"stem_states": states, "attention_mask": mask}


def tokenize(model, tokenizer, inputs: list[tuple[int, str]], max_seq_length: int) -> list[list[int]]:
    """The token ids a forward pass would see: the domain token, the text, truncated to `max_seq_length`."""
    texts = [model.config.prepend_domain_token([text], model.config.domains[domain])[0] for domain, text in inputs]
    return tokenizer(texts, truncation=True, max_length=max_seq_length)["input_ids"]


def fingerprint(model, token_ids: list[list[int]], mixed_precision: str) -> str:
    """SHA-256 over what a stem state depends on: the stem's weights, the token ids of every input, the precision."""
    digest = hashlib.sha256(FORMAT)
    for name, tensor in model.stem_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(mixed_precision.encode())
    for ids in token_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:32]


def write_states(model, token_ids: list[list[int]], folder: Path, mixed_precision: str, batch_size: int):
    """Run the stem over every input, longest first (little padding), and store the unpadded rows."""
    with writing_folder(folder) as tmp:
        _write_states(model, token_ids, tmp, mixed_precision, batch_size)


def _write_states(model, token_ids: list[list[int]], tmp: Path, mixed_precision: str, batch_size: int):
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.lib.format.open_memmap(tmp / "states.npy", "w+", np.float32, (int(offsets[-1]), model.config.hidden_size))
    order = np.argsort(-lengths, kind="stable")
    was_training = model.training
    model.eval()  # no dropout: the stored states are what the forward pass computes
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="stem states (computed once)", unit="batch"):
            rows = order[start : start + batch_size]
            width = int(lengths[rows].max())
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)
            attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : lengths[row]] = torch.tensor(token_ids[row])
                attention_mask[i, : lengths[row]] = 1
            with torch.no_grad(), autocast(model.device.type, mixed_precision):
                states = model.stem_states(input_ids.to(model.device), attention_mask.to(model.device))
            states = states.float().cpu().numpy()
            for i, row in enumerate(rows):
                values[offsets[row] : offsets[row + 1]] = states[i, : lengths[row]]
    finally:
        model.train(was_training)
    values.flush()
    del values
    np.save(tmp / "offsets.npy", offsets)

