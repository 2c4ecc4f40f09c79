"""Contrastive training of MoE-BERT on co-cited abstract pairs, with Accelerate.

    python train.py                                   # embedded sample, embedded base model, a few minutes on CPU
    accelerate launch train.py --model_name_or_path allenai/scibert_scivocab_uncased \
        --dataset CVD=GleghornLab/abstract_domain_cvd --dataset COPD=GleghornLab/abstract_domain_copd \
        --per_device_train_batch_size 32 --mixed_precision bf16 --output_dir outputs/moebert

Each positive pair (a, b) of a domain gets the domain token in front of both texts and trains that domain's
expert with the Multiple Negatives Ranking loss: the other pairs of the batch are the negatives. With several
processes the embeddings of every process are gathered (gradients flow to the local ones), so each process scores
its pairs against the global batch.
"""

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, get_linear_schedule_with_warmup

from data.loading import DatasetError, load_domain_datasets, parse_dataset_specs
from defaults import default_base_model
from modeling_moebert import MoEBertModel

DEFAULT_OUTPUT_DIR = "outputs/moebert"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="BERT to upcycle or a MoE-BERT checkpoint")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--moe_layers", default="all", help="all | middle | 0,5,11")
    parser.add_argument("--routing_mode", default="sentence", choices=["sentence", "token"])
    parser.add_argument("--shared_expert", action="store_true", help="one expert for all domains (baseline)")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--scale", type=float, default=20.0, help="cosine similarity scale of the loss")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval_steps", type=int, default=None, help="evaluate on valid every N steps (and at the end)")
    parser.add_argument("--checkpointing_steps", default=None, help="N or 'epoch'")
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help="PATH or 'latest'")
    parser.add_argument("--with_tracking", action="store_true")
    parser.add_argument("--report_to", default="tensorboard")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ loss


def gather_keep_grad(local: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """All processes' rows; this process's own rows keep their gradient."""
    if accelerator.num_processes == 1:
        return local
    gathered = list(accelerator.gather(local.detach()).split(local.shape[0]))
    gathered[accelerator.process_index] = local
    return torch.cat(gathered)


def multiple_negatives_ranking_loss(emb_a, emb_b, scale: float, accelerator: Accelerator | None = None):
    """Symmetric MNR loss: each a_i must pick b_i among all b of the (global) batch, and each b_i its a_i."""
    emb_a, emb_b = F.normalize(emb_a, dim=-1), F.normalize(emb_b, dim=-1)
    all_a = gather_keep_grad(emb_a, accelerator) if accelerator else emb_a
    all_b = gather_keep_grad(emb_b, accelerator) if accelerator else emb_b
    offset = accelerator.process_index * emb_a.shape[0] if accelerator else 0
    targets = torch.arange(emb_a.shape[0], device=emb_a.device) + offset
    a_to_b = F.cross_entropy(scale * emb_a @ all_b.T, targets)
    b_to_a = F.cross_entropy(scale * emb_b @ all_a.T, targets)
    return (a_to_b + b_to_a) / 2


# ------------------------------------------------------------------------------------------------ model and data


def load_model(args, domains: list[str]):
    path = args.model_name_or_path or default_base_model()
    config, _ = PretrainedConfig.get_config_dict(path)  # local folder or Hub id
    if config.get("model_type") == "moebert":
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        for domain in domains:
            if domain not in model.config.domains:
                model.add_domain(domain, tokenizer)
        return model, tokenizer
    return MoEBertModel.from_bert(
        path,
        domains=domains,
        moe_layers=args.moe_layers,
        routing_mode=args.routing_mode,
        num_experts=1 if args.shared_expert else None,
    )


def training_pairs(datasets: dict, domains: list[str]):
    """The positive train pairs of every domain, with the domain id."""
    from datasets import concatenate_datasets

    parts = []
    for domain, dataset in datasets.items():
        positives = dataset["train"].filter(lambda label: label == 1, input_columns="label")
        if len(positives) == 0:
            raise DatasetError(f"domain {domain}: the train split has no positive (label 1) pair to train on.")
        parts.append(positives.select_columns(["a", "b"]).add_column("domain_id", [domains.index(domain)] * len(positives)))
    return concatenate_datasets(parts)


def make_collate(model, tokenizer, max_seq_length: int):
    tokens = model.config.domain_tokens

    def collate(rows):
        def encode(column):
            texts = [f"{tokens[r['domain_id']]} {r[column]}" for r in rows]
            return tokenizer(texts, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt")

        return {"a": encode("a"), "b": encode("b"), "domain_ids": torch.tensor([r["domain_id"] for r in rows])}

    return collate


# ------------------------------------------------------------------------------------------------ evaluation, saving


def evaluate(model, tokenizer, datasets, args) -> dict:
    from eval import TransformerEncoder, evaluate_model

    model.eval()
    encoder = TransformerEncoder(model, tokenizer, args.max_seq_length, args.per_device_eval_batch_size)
    results, _ = evaluate_model(encoder, datasets, "valid")
    model.train()
    return results


def save_model(model, tokenizer, folder: Path, card: dict):
    """Write a folder loadable with AutoModel.from_pretrained(folder, trust_remote_code=True). Everything is
    written beside it first and then moved in file by file, so an interrupted save never leaves a half file, and
    other contents of the folder (checkpoints) stay."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training_state.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    (tmp / "README.md").write_text(model_card(card))
    folder.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.rglob("*")):
        if entry.is_file():
            target = folder / entry.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, target)
    shutil.rmtree(tmp)


def model_card(card: dict) -> str:
    metrics = card.get("metrics", {}).get("all", {})
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [moebert, mixture-of-experts, sentence-embeddings, co-citation]",
        "---",
        "# MoE-BERT",
        "",
        f"Domains: {', '.join(card['domains'])}. Load with `AutoModel.from_pretrained(repo, trust_remote_code=True)`;",
        "put the domain token in front of each text (`[DOMAIN] text`) and use `pooler_output`.",
        "",
        f"Trained {card['step']} steps with MoEBERT's train.py on: {card['datasets']}.",
        "",
        "Validation (pooled over domains): "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("f1_max", "roc_auc", "average_precision")),
        "",
        "Training arguments:",
        "```json",
        json.dumps(card["args"], indent=2, default=str),
        "```",
    ]
    return "\n".join(lines) + "\n"


def save_checkpoint(accelerator, model, tokenizer, output_dir: Path, step: int, card: dict, limit: int):
    """`checkpoint-<step>/`: the full training state (accelerator.save_state) and a loadable `model/` folder,
    written under a temporary name and renamed when complete; only the newest `limit` are kept."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, tmp / "model", card)
        os.replace(tmp, final)
        for old in sorted(checkpoints(output_dir), key=checkpoint_step)[:-limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    tracking = {"log_with": args.report_to, "project_dir": args.output_dir} if args.with_tracking else {}
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **tracking,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # each process would train alone and overwrite the others' files
        raise SystemExit(
            f"error: {launched} processes were launched but Accelerate sees {accelerator.num_processes}. On a machine "
            "without GPUs, launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ..."
        )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    specs = parse_dataset_specs(args.dataset)
    try:
        datasets = load_domain_datasets(specs)
        domains = list(specs)
        train_pairs = training_pairs(datasets, domains)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    model, tokenizer = load_model(args, domains)
    domains = model.config.domains

    dataloader = DataLoader(
        train_pairs,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        drop_last=True,  # equal batches on every process, for the gathered negatives
        # its own generator: starting an epoch must not draw from the global RNG, which drives dropout, or a
        # resumed run (whose iterator starts after the RNG state is restored) would see other dropout masks
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=make_collate(model, tokenizer, args.max_seq_length),
    )
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    updates_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    epochs = math.ceil(max_steps / max(updates_per_epoch, 1))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * max_steps) * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    if args.with_tracking:
        accelerator.init_trackers("moebert", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    step, start_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        found = checkpoints(output_dir)
        path = max(found, key=checkpoint_step) if args.resume_from_checkpoint == "latest" and found else None
        path = path or (Path(args.resume_from_checkpoint) if args.resume_from_checkpoint != "latest" else None)
        if path is not None:
            accelerator.print(f"resuming from {path}")
            accelerator.load_state(str(path))
            step = checkpoint_step(path)
            start_epoch = step // updates_per_epoch
            skip_batches = (step % updates_per_epoch) * args.gradient_accumulation_steps

    card = {"domains": domains, "datasets": specs, "args": vars(args), "step": step, "metrics": {}}
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training")
    model.train()
    for epoch in range(start_epoch, epochs):
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)  # the seedable sampler shuffles each epoch the same way in every run
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(model):
                emb_a = model(**batch["a"], domain_ids=batch["domain_ids"]).pooler_output
                emb_b = model(**batch["b"], domain_ids=batch["domain_ids"]).pooler_output
                loss = multiple_negatives_ranking_loss(emb_a, emb_b, args.scale, accelerator)
                accelerator.backward(loss)
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
                card["metrics"] = evaluate_on_main(accelerator, model, tokenizer, datasets, args, step)
            if args.checkpointing_steps and args.checkpointing_steps.isdigit() and step % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args.checkpoints_total_limit)
            if step >= max_steps:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args.checkpoints_total_limit)
        if step >= max_steps:
            break

    if not (args.eval_steps and step % args.eval_steps == 0):
        card["metrics"] = evaluate_on_main(accelerator, model, tokenizer, datasets, args, step)
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, output_dir, card)
        print(f"model saved to {output_dir}/")
    accelerator.end_training()
    return card


def evaluate_on_main(accelerator, model, tokenizer, datasets, args, step) -> dict:
    results = {}
    if accelerator.is_main_process:
        results = evaluate(accelerator.unwrap_model(model), tokenizer, datasets, args)
        pooled = results.get("all", {})
        print(f"step {step} valid: " + ", ".join(f"{k} {pooled[k]:.4f}" for k in ("f1_max", "roc_auc") if k in pooled))
        if args.with_tracking:
            accelerator.log({f"valid/{k}": v for k, v in pooled.items() if isinstance(v, float)}, step=step)
    accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    main()
