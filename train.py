"""Contrastive training of MoE-BERT on co-cited abstract pairs, with Accelerate.

    python train.py                                   # embedded sample, embedded base model, 8-11 minutes on CPU
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
import json
import math
import os
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed.nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from huggingface_hub import constants
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PretrainedConfig, get_linear_schedule_with_warmup
from transformers.models.bert.modeling_bert import BertSelfAttention

from data.loading import SAMPLE_DIR, DatasetError, load_domain_datasets, parse_dataset_specs
from defaults import DEFAULT_BASE_MODEL_ID, default_base_model, local_copy
from modeling_moebert import MoEBertModel
from training import (
    BASE_METRICS,
    BestModel,
    HubPusher,
    ShardedEncoder,
    checkpoint_step,
    checkpoints,
    copy_model,
    multiple_negatives_ranking_loss,
    replace_folder,
    resumed_step,
    save_model,
    train_dataloader,
    training_pairs,
)

DEFAULT_OUTPUT_DIR = "outputs/moebert"
BEST_MODEL_DIR = "best_model"
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
        f"the quick default of {QUICK_STEPS} steps, 8 to 11 minutes on a 2-core CPU)",
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
        "--attention_dropout", type=float, default=None, help="dropout on the attention probabilities (default: the "
        "model's, 0.1 in BERTs); with 0, a CPU keeps its fused attention in training (a 256-token forward 2.7x faster)",
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass: less "
        "memory for large bases or long inputs, about a third more compute",
    )
    parser.add_argument(
        "--ddp_timeout", type=int, default=1800, help="seconds a collective may wait (several processes), e.g. the "
        "others while the main process writes a checkpoint or the best model",
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


# ------------------------------------------------------------------------------------------------ model and step


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


def set_attention_dropout(model, probability: float):
    """In the config (saved with the model) and in every attention block already built."""
    model.config.attention_probs_dropout_prob = probability
    for module in model.modules():
        if isinstance(module, BertSelfAttention):
            module.dropout.p = probability


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


def evaluate(model, tokenizer, datasets, args, accelerator: Accelerator | None = None) -> dict:
    """Valid metrics; with several processes each encodes a share of the texts and all get the same results."""
    from eval import TransformerEncoder, evaluate_model

    model.eval()
    encoder = TransformerEncoder(model, tokenizer, args.max_seq_length, args.per_device_eval_batch_size)
    if accelerator is not None and accelerator.num_processes > 1:
        encoder = ShardedEncoder(encoder, accelerator)
    results, _ = evaluate_model(encoder, datasets, "valid")
    model.train()
    return results


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
            # the other processes wait in a barrier while the main process writes checkpoints and the best model
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
    if args.attention_dropout is not None:
        set_attention_dropout(model, args.attention_dropout)
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


def evaluate_and_keep_best(accelerator, model, tokenizer, datasets, args, card: dict, best: BestModel):
    """Score valid (every process encodes a share); on the main process keep the best model in
    OUTPUT_DIR/best_model; tell every process when patience has run out (accelerator's trigger, so all of them stop
    at the same step)."""
    metrics = evaluate(accelerator.unwrap_model(model), tokenizer, datasets, args, accelerator)
    if accelerator.is_main_process:
        step = card["step"]
        card["metrics"] = {**metrics, "step": step}
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
