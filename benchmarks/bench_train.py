"""Training throughput (pairs/s) of MoE-BERT against the dense model, on the same pairs, through train.py's code.

    python benchmarks/bench_train.py [--model_name_or_path PATH] [--per_device_train_batch_size 16]
                                     [--max_seq_length 128] [--steps 6] [--mixed_precision bf16]

Both models are upcycled from the same checkpoint with train.py's `load_model`: "dense" has one shared expert
(the same compute graph as the base BERT), "moe" one expert per domain of the embedded sample. Each runs the real
training step of train.py (two forward passes, masked MNR loss, backward, clipping, AdamW) on the same mixed-domain
batches of the embedded sample; the timed steps alternate between the two models, after one warm-up step each.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
import training  # noqa: E402
from data.loading import load_domain_datasets, parse_dataset_specs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    options = parser.parse_args()

    accelerator = Accelerator(mixed_precision=options.mixed_precision)
    specs = parse_dataset_specs(None)
    pairs, known = training.training_pairs(load_domain_datasets(specs), list(specs))
    runs = {}
    for name, flags in (("dense", ["--shared_expert"]), ("moe", [])):
        args = train.parse_args(
            ["--per_device_train_batch_size", str(options.per_device_train_batch_size),
             "--max_seq_length", str(options.max_seq_length)] + flags
            + (["--model_name_or_path", options.model_name_or_path] if options.model_name_or_path else [])
        )
        model, tokenizer = train.load_model(args, list(specs))
        batches = list(zip(range(options.steps + 1), training.train_dataloader(pairs, model, tokenizer, args, 1)))
        optimizer = train.make_optimizer(model, args)
        model, optimizer = accelerator.prepare(model, optimizer)
        runs[name] = (model, optimizer, args, [move(batch, accelerator.device) for _, batch in batches])

    def step(name: str, index: int) -> float:
        model, optimizer, args, batches = runs[name]
        batch = batches[index]
        start = time.perf_counter()
        train.backward_step(model, batch, args, accelerator, known)
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
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
    print(f"device {accelerator.device}, mixed precision {options.mixed_precision}, batch {pairs_per_step} pairs, "
          f"max_seq_length {options.max_seq_length}, {options.steps} timed steps each (median)")
    for name, values in times.items():
        model = runs[name][0]
        print(f"{name:>5}: {pairs_per_step / statistics.median(values):7.2f} pairs/s  "
              f"({statistics.median(values):.3f} s/step, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)")
    ratio = statistics.median(times["dense"]) / statistics.median(times["moe"])
    print(f"MoE / dense throughput: {ratio:.3f}x")


def move(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


if __name__ == "__main__":
    main()
