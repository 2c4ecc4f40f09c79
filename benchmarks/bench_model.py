"""Throughput of MoE-BERT against its dense base, on the same inputs, in one run.

    python -m benchmarks.bench_model [--model_name_or_path PATH] [--batch_size 32] [--seq_len 256] [--repeats 5]

Prints sequences/s for inference (dense base; MoE with one expert per domain on a mixed-domain batch and on a
single-domain batch; the same MoE with a naive dispatch that runs every expert on every token), the time of a training step
(forward + backward) for dense and MoE, and parameter counts (total, and active per token).
"""

import argparse
import statistics
import time

import torch

from transformers import BertModel

from benchmarks.naive_routing import naive_routing
from modeling_moebert import MoEBertLayer, MoEBertModel
from moebert.names import default_base_model

DOMAINS = ["CVD", "COPD", "SKIN", "PARA", "AUTO"]


def make_batch(model: MoEBertModel, batch_size: int, seq_len: int) -> dict:
    """Random word pieces behind [CLS] and a domain token; the domains cycle so every expert gets rows."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 29000, (batch_size, seq_len), generator=generator)
    domain_ids = torch.arange(batch_size) % len(model.config.domains)
    input_ids[:, 0] = 101
    input_ids[:, 1] = torch.tensor(model.config.domain_token_ids)[domain_ids]
    input_ids[:, -1] = 102
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def time_interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, after one warm-up run each; the calls take turns so that drift in the
    machine's speed (heat, other load) falls on all of them alike."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def naive(fn):
    def run():
        with naive_routing():
            fn()

    return run


def inference(model, batch):
    def run():
        with torch.inference_mode():
            model(**batch)

    return run


def training_step(model, batch):
    def run():
        model.zero_grad(set_to_none=True)
        output = model(**batch)
        output.last_hidden_state.mean(dim=1).pow(2).sum().backward()

    return run


def parameter_counts(model: MoEBertModel) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    idle_experts = sum(
        p.numel()
        for layer in model.encoder.layer
        if isinstance(layer, MoEBertLayer)
        for expert in layer.experts[1:]
        for p in expert.parameters()
    )
    return total, total - idle_experts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="dense BERT to compare (default: all-MiniLM-L6-v2)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base_path = args.model_name_or_path or default_base_model()

    dense = BertModel.from_pretrained(base_path, add_pooling_layer=False)
    moe, tokenizer = MoEBertModel.from_bert(base_path, domains=DOMAINS)
    dense.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # same embedding size, so only the routing differs
    batch = make_batch(moe, args.batch_size, args.seq_len)
    single_domain_batch = {**batch, "domain_ids": torch.zeros(args.batch_size, dtype=torch.long)}
    print(f"base {base_path}\nbatch {args.batch_size} x {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"{len(DOMAINS)} experts in layers {moe.config.moe_layers}, mixed-domain batch, median of {args.repeats}")

    dense.eval(), moe.eval()
    seconds = time_interleaved(
        {
            "dense base": inference(dense, batch),
            "MoE-BERT (grouped dispatch)": inference(moe, batch),
            "MoE-BERT, single-domain batch": inference(moe, single_domain_batch),
            "MoE-BERT (naive: all experts)": naive(inference(moe, batch)),
        },
        args.repeats,
    )
    print("\ninference                         seq/s    vs dense")
    for name, s in seconds.items():
        print(f"  {name:30s} {args.batch_size / s:8.1f}    {seconds['dense base'] / s:6.3f}x")

    dense.train(), moe.train()
    seconds = time_interleaved(
        {"dense base": training_step(dense, batch), "MoE-BERT (grouped dispatch)": training_step(moe, batch)},
        args.repeats,
    )
    print("\ntraining step (forward+backward)  s/step   vs dense")
    for name, s in seconds.items():
        print(f"  {name:30s} {s:8.3f}    {seconds['dense base'] / s:6.3f}x")

    total, active = parameter_counts(moe)
    dense_total = sum(p.numel() for p in dense.parameters())
    print(f"\nparameters: dense {dense_total / 1e6:.2f}M; MoE total {total / 1e6:.2f}M, active per token {active / 1e6:.2f}M")


if __name__ == "__main__":
    main()
