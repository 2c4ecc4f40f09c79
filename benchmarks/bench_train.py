"""Training step cost (pairs/s) of train.py's settings, on the same batches, through train.py's own code.

    python -m benchmarks.bench_train [--model_name_or_path PATH] [--per_device_train_batch_size 16]
                                     [--max_seq_length 256] [--steps 6] [--mixed_precision bf16|no]

Each row is a model built as train.py builds it (moebert.training.setup) with the settings shown, running the real
training step (masked
MNR loss over pairs and one hard negative each, backward, clipping, AdamW) on the same same-domain batches of the
embedded sample; the timed steps alternate between the rows, after one warm-up step each. Rows:

- dense: one shared expert in every layer, the compute graph of the base BERT (the MoE's routing cost shows
  against it);
- the former default step: experts in all layers, attention dropout 0.1 (CPU attention leaves its fused kernel);
- attention dropout 0; then experts in the top two layers only (the frozen layers below need no backward);
- the default: experts in the top two layers, the frozen stem (everything below the first expert) read from
  stored states, computed once per text: its one-off cost per text is printed beside.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from moebert.data.pairs import load_domain_datasets, parse_dataset_specs
from moebert.device import bf16_is_native, default_device
from moebert.models.builder import build_model
from moebert.names import default_base_model
from moebert.training.batches import DomainBatchSampler, make_collate, training_pairs
from moebert.training.losses import backward_step
from moebert.training.recipes import RECIPES
from moebert.training.setup import make_optimizer, set_attention_dropout, train_only
from moebert.training.stem_states import StemStates

QUICK = RECIPES["quick"]
PLAIN = {"reuse_stem_states": False}
ROWS = {  # settings over the quick recipe's
    "dense (one shared expert), all layers": {"shared_expert": True, "moe_layers": "all", "attention_dropout": 0.1} | PLAIN,
    "MoE, all layers, attention dropout 0.1 (former default)": {"moe_layers": "all", "attention_dropout": 0.1} | PLAIN,
    "MoE, all layers, attention dropout 0": {"moe_layers": "all"} | PLAIN,
    "MoE, top two layers": PLAIN,
    "MoE, top two layers, stored stem states (default)": {},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: the quick "
                        "recipe's (bf16 where native)")
    options = parser.parse_args()
    native = "bf16" if bf16_is_native(default_device()) else "no"
    accelerator = Accelerator(mixed_precision=options.mixed_precision or native)

    specs = parse_dataset_specs(None)
    datasets = load_domain_datasets(specs)
    pairs, known = training_pairs(datasets, list(specs), hard_negatives=1)
    runs, stem_seconds = {}, None
    for name, settings in ROWS.items():
        settings = QUICK | {"shared_expert": False} | settings
        model, tokenizer = build_model(options.model_name_or_path or default_base_model(), list(specs),
                                       settings["moe_layers"], 1 if settings["shared_expert"] else None)
        set_attention_dropout(model, settings["attention_dropout"])
        sampler = DomainBatchSampler(pairs["domain_id"], options.per_device_train_batch_size, 1, seed=42)
        rows = [[pairs[i] for i in batch] for _, batch in zip(range(options.steps + 1), sampler)]
        train_only(model, "experts" if settings["train_experts_only"] else "all")
        stems = None
        if settings["reuse_stem_states"]:
            inputs = sorted({(r["domain_id"], t) for batch in rows for r in batch for t in [r["a"], r["b"], *r["hard"]]})
            started = time.perf_counter()
            stems = StemStates.open_or_build(model, tokenizer, inputs, options.max_seq_length, Path(tempfile.mkdtemp()),
                                             accelerator.mixed_precision, 64)
            stem_seconds = (time.perf_counter() - started) / len(inputs)
        collate = make_collate(model, tokenizer, options.max_seq_length, stems)
        optimizer = make_optimizer(model, settings["learning_rate"], 0.01)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        runs[name] = (model, optimizer, [move(collate(batch), accelerator.device) for batch in rows])

    def step(name: str, index: int) -> float:
        model, optimizer, batches = runs[name]
        start = time.perf_counter()
        backward_step(model, batches[index], accelerator, known, scale=20.0)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in runs}
    for name in runs:
        step(name, 0)  # warm-up
    for index in range(1, options.steps + 1):
        for name in runs:
            times[name].append(step(name, index))
    pairs_per_step = options.per_device_train_batch_size
    print(f"\ndevice {accelerator.device}, mixed precision {accelerator.mixed_precision}, {pairs_per_step} pairs + 1 hard "
          f"negative each per step, max_seq_length {options.max_seq_length}, {options.steps} timed steps each (median)\n")
    print("| step | s/step | pairs/s | vs former default |\n|---|---|---|---|")
    former = statistics.median(times[list(ROWS)[1]])
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.3f} | {pairs_per_step / seconds:.2f} | {former / seconds:.2f}x |")
    dense, moe = (statistics.median(times[name]) for name in list(ROWS)[:2])
    print(f"\nMoE / dense throughput (all layers): {dense / moe:.3f}x")
    print(f"stored stem states: computed once, {1000 * stem_seconds:.1f} ms per text")


def move(batch: dict, device) -> dict:
    """Tensors and tokenizer outputs have .to(); stored stem states come as a dict of tensors."""
    return {k: v.to(device) if hasattr(v, "to") else {n: t.to(device) for n, t in v.items()} for k, v in batch.items()}


if __name__ == "__main__":
    main()
