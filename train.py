"""Contrastive training of MoE-BERT on co-cited abstract pairs, with Accelerate.

    python train.py                                   # embedded sample and base model: 16 minutes on a 2-core CPU
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
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed.nn
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from huggingface_hub import constants
from tqdm.auto import tqdm
from transformers import PretrainedConfig, get_linear_schedule_with_warmup
from transformers.models.bert.modeling_bert import BertSelfAttention

from data.loading import SAMPLE_DIR, DatasetError, load_domain_datasets, parse_dataset_specs
from defaults import default_base_model, local_copy, public_name
from encoders import StemEncoder, TransformerEncoder, bf16_is_native, default_device, load_moebert
from modeling_moebert import MoEBertModel
from stem_cache import StemStates
from training import (
    BASE_METRICS,
    BestExperts,
    BestModel,
    HubPusher,
    ShardedEncoder,
    checkpoint_step,
    checkpoints,
    copy_model,
    recover_folder,
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
QUICK_STEPS = 750  # the quick recipe's length: 12,000 pairs, 16 minutes on a 2-core CPU, evaluations included
# `--recipe full`: settings chosen on `valid` on an H100 (README, "The full recipe"); explicit flags still win
FULL_RECIPE = {
    "num_train_epochs": 1, "per_device_train_batch_size": 32, "max_seq_length": 256, "mixed_precision": "bf16",
    "train_experts_only": False, "moe_layers": "all", "attention_dropout": None, "eval_steps": 100,
    "learning_rate": 2e-5, "load_best_model_at_end": True,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe", default="auto", choices=["auto", "quick", "full"],
        help=f"quick (the defaults below): {QUICK_STEPS} steps at 256 tokens, experts in the top two layers only, for a "
        "CPU; full: all train pairs at 256 tokens, all weights, bf16, the best model on valid kept ("
        + ", ".join(f"{k}={v}" for k, v in FULL_RECIPE.items()) + "), for a GPU; auto: full with a CUDA or MPS "
        "device, else quick. Any flag given explicitly overrides the recipe's value",
    )
    parser.add_argument("--model_name_or_path", default=None, help="BERT to upcycle or a MoE-BERT checkpoint")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument(
        "--moe_layers", default="top2", help="all | upper (the upper half) | top2 (the last two layers) | middle | "
        "0,5,11; with experts in upper layers only, the frozen layers below are computed once per text "
        "(--reuse_stem_states)",
    )
    parser.add_argument("--routing_mode", default="sentence", choices=["sentence", "token"])
    parser.add_argument("--shared_expert", action="store_true", help="one expert for all domains (baseline)")
    parser.add_argument(
        "--train_experts_only", action=argparse.BooleanOptionalAction, default=True,
        help="freeze the shared weights (embeddings, attention, LayerNorm): training a domain then changes only its "
        "own expert, so the other domains keep computing exactly what they did (--no-train_experts_only: train all)",
    )
    parser.add_argument(
        "--reuse_stem_states", action=argparse.BooleanOptionalAction, default=None,
        help="with --train_experts_only: compute everything below the first MoE layer's experts (frozen) once per "
        "text, without dropout, and train from there (default: on with --train_experts_only)",
    )
    parser.add_argument("--stem_cache_dir", default=None, help="where stem states are kept (default: OUTPUT_DIR/stem-states)")
    parser.add_argument(
        "--select_experts_per_domain", action=argparse.BooleanOptionalAction, default=None,
        help="with --train_experts_only and several experts: each domain keeps its expert from the evaluation that "
        "scored best on its own valid pairs (the untrained one included) and the final model is assembled from "
        "them (default: on with --train_experts_only, unless --load_best_model_at_end)",
    )
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument(
        "--num_train_epochs", type=int, default=None,
        help=f"the full recipe: this many passes over the train pairs (with neither this nor --max_train_steps: "
        f"the quick default of {QUICK_STEPS} steps, about 16 minutes on a 2-core CPU)",
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
    parser.add_argument("--max_seq_length", type=int, default=256)
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
    parser.add_argument(
        "--guide_false_negatives", action="store_true", help="also leave out in-batch candidates that the untrained "
        "model scores above the pair's own positive (GISTEmbed's guided filtering; needs --mask_false_negatives)",
    )
    parser.add_argument(
        "--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
        help="default: bf16 where the device computes it natively (CPUs with AVX512-BF16 or AMX, CUDA Ampere+), else no",
    )
    parser.add_argument(
        "--attention_dropout", type=float, default=0.0, help="dropout on the attention probabilities (the full "
        "recipe: the model's own, 0.1 in BERTs); with 0, a CPU keeps its fused attention in training (a 256-token "
        "forward 2.7x faster)",
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
        "--eval_steps", type=int, default=75, help="evaluate on valid every N steps (always before training and at the end)"
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
    parser.add_argument(
        "--stop_timeout", type=float, default=60, help="on SIGTERM/SIGINT: seconds to wait for queued Hub uploads after "
        "the checkpoint is written (a preempted machine has little time left)",
    )
    parser.add_argument("--hub_token", default=None, help="default: the token saved by `hf auth login` or HF_TOKEN")
    recipe = parser.parse_known_args(argv)[0].recipe
    recipe, reason = device_recipe() if recipe == "auto" else (recipe, "asked for with --recipe")
    if recipe == "full":
        parser.set_defaults(**FULL_RECIPE)
    args = parser.parse_args(argv)
    args.recipe, args.recipe_reason = recipe, reason
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if bf16_is_native(default_device()) else "no"
    resolve_frozen_options(parser, args)
    if Path.cwd().resolve().is_relative_to(Path(args.output_dir).resolve()):
        parser.error("--output_dir must not be the working directory or hold it: the final model is swapped in as a "
                     "whole folder; name a folder below it, e.g. --output_dir outputs/moebert")
    if args.guide_false_negatives and not args.mask_false_negatives:
        parser.error("--guide_false_negatives adds to the false-negative masks: drop --no-mask_false_negatives")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME")
    if args.push_to_hub and constants.HF_HUB_OFFLINE:
        parser.error("--push_to_hub needs the network, but HF_HUB_OFFLINE is set: unset it or drop --push_to_hub")
    return args


def device_recipe() -> tuple[str, str]:
    """The recipe for this machine, and why: a GPU trains everything on all pairs, a CPU the quick recipe."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "quick", "ACCELERATE_USE_CPU is set"
    if torch.cuda.is_available():
        return "full", f"a CUDA device ({torch.cuda.get_device_name()}) is available"
    if torch.backends.mps.is_available():
        return "full", "an MPS device is available"
    return "quick", "no CUDA or MPS device, so the CPU recipe (--recipe full: all pairs, all weights, for a GPU)"


def resolve_frozen_options(parser, args):
    """Stem reuse and per-domain selection need the shared weights frozen; both are on by default where they can be."""
    frozen = args.train_experts_only
    if not frozen and (args.reuse_stem_states or args.select_experts_per_domain):
        parser.error("--reuse_stem_states and --select_experts_per_domain need --train_experts_only (with the shared "
                     "weights trained, neither the stem nor another domain's score stays fixed)")
    if args.select_experts_per_domain and (args.shared_expert or args.load_best_model_at_end):
        parser.error("--select_experts_per_domain needs one expert per domain and picks the final model itself: drop "
                     "--shared_expert / --load_best_model_at_end, or add --no-select_experts_per_domain")
    if args.reuse_stem_states is None:
        args.reuse_stem_states = frozen
    if args.select_experts_per_domain is None:
        args.select_experts_per_domain = frozen and not args.shared_expert and not args.load_best_model_at_end


# ------------------------------------------------------------------------------------------------ model and step


def load_model(args, domains: list[str]):
    path = args.model_name_or_path or default_base_model()
    config, _ = PretrainedConfig.get_config_dict(path)  # local folder or Hub id
    if config.get("model_type") == "moebert":
        model, tokenizer = load_moebert(path)  # this project's classes: no code from the checkpoint runs
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
    model.config.base_model_name_or_path = public_name(str(path))  # published: a Hub id, never a local folder
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


def evaluate(model, tokenizer, datasets, args, accelerator: Accelerator | None = None, stems=None) -> dict:
    """Valid metrics; with several processes each encodes a share of the texts and all get the same results.
    With stored stem states, each text is encoded from the first MoE layer's experts up. The model's calibration
    (cosine -> probability of co-citation, per domain) is refitted on these valid scores, so every model saved
    (best, checkpoint, final) carries the calibration of its own weights."""
    from eval import evaluate_model, fit_calibration

    model.eval()
    if stems is not None:
        encoder = StemEncoder(model, stems, args.per_device_eval_batch_size)
    else:
        encoder = TransformerEncoder(model, tokenizer, args.max_seq_length, args.per_device_eval_batch_size)
    if accelerator is not None and accelerator.num_processes > 1:
        encoder = ShardedEncoder(encoder, accelerator)
    results, scored = evaluate_model(encoder, datasets, "valid")
    model.config.calibration = fit_calibration(scored)
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
    with saving(final, tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        with saving(final, tmp):
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
    accelerator.print(f"recipe {args.recipe}: {args.recipe_reason}")
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
    stop = StopRequest()
    completed = False
    try:
        card = train(args, accelerator, pusher, stop)
        completed = True
        return card
    except TrainingStopped as stopped:
        abandoned = 0
        if pusher:  # a bounded wait: the machine is going away
            abandoned = pusher.finish(completed=False, timeout=args.stop_timeout)
            pusher = None
        accelerator.print(f"stopped by {stopped.name} after step {stopped.step}: checkpoint in {stopped.checkpoint}; "
                          f"resume with: {resume_command(sys.argv if argv is None else ['train.py', *argv])}", flush=True)
        if abandoned:  # the interpreter would wait at exit for the upload threads: leave without them
            sys.stderr.flush()
            os._exit(128 + stopped.signum)
        raise SystemExit(128 + stopped.signum) from None
    finally:  # also when training fails: what was queued is still sent, or reported
        stop.restore()
        if pusher:
            pusher.finish(completed=completed)


def check_checkpoint_fits(path: Path, model):
    """Refuse, in one line, a checkpoint written for another model (other base, domains or expert layers)."""
    saved = json.loads((path / "model" / "config.json").read_text())
    fields = ("domains", "moe_layers", "num_experts", "hidden_size", "num_hidden_layers", "vocab_size")
    differ = [f"{k}: checkpoint {saved.get(k)}, this run {getattr(model.config, k)}" for k in fields
              if saved.get(k) != getattr(model.config, k)]
    if differ:
        raise SystemExit(f"error: --resume_from_checkpoint {path} was written for another model ({'; '.join(differ)}); "
                         "resume with the flags it was trained with, or start a new --output_dir.")


@contextlib.contextmanager
def saving(what: Path, partial: Path | None = None):
    """A save that fails for want of space or rights ends the run in one line; nothing written before is lost, and
    what it had half written (`partial`) is removed."""
    try:
        yield
    except OSError as error:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(
            f"error: cannot write {what} ({error.strerror or error}); the model saved before and every finished "
            "checkpoint are intact. Free space (or fix the rights) and resume with --resume_from_checkpoint latest."
        ) from None


def public_arg(value):
    """A command-line value as the published card shows it: paths as `public_name` names them (`DOMAIN=SOURCE` too)."""
    if isinstance(value, list):
        return [public_arg(v) for v in value]
    if isinstance(value, str) and "=" in value and not os.path.isabs(value):
        domain, _, source = value.partition("=")
        return f"{domain}={public_name(source)}"
    return public_name(value) if isinstance(value, str) else value


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run from its latest checkpoint."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume_from_checkpoint"):
            skip = arg == "--resume_from_checkpoint"
            continue
        kept.append(arg)
    return " ".join(["python", *kept, "--resume_from_checkpoint", "latest"])


class TrainingStopped(Exception):
    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.name, self.step, self.checkpoint = signum, signal.Signals(signum).name, step, checkpoint


class StopRequest:
    """SIGTERM (what Slurm, Kubernetes and spot instances send before they kill) and SIGINT (Ctrl-C): the first asks
    training to stop after the current step with a checkpoint; a second one exits at once."""

    def __init__(self):
        self.signum = None
        in_main_thread = threading.current_thread() is threading.main_thread()  # the only one that may set handlers
        signals = (signal.SIGTERM, signal.SIGINT) if in_main_thread else ()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again to exit at "
              "once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        asked = torch.tensor([0 if self.signum is None else self.signum], device=accelerator.device)
        signums = accelerator.gather(asked)
        self.signum = self.signum or int(signums.max())
        return bool(signums.max())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(args, accelerator: Accelerator, pusher: "HubPusher | None", stop: StopRequest) -> dict:
    output_dir = Path(args.output_dir).resolve()
    if accelerator.is_main_process:
        for folder in (output_dir, output_dir / BEST_MODEL_DIR):  # a swap of folders that a kill cut short
            if recover_folder(folder):
                print(f"{folder}: finished the model save a kill had interrupted")
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    specs = parse_dataset_specs(args.dataset)
    try:
        datasets = load_domain_datasets(specs)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        model, tokenizer = load_model(args, list(specs))
    except (OSError, ValueError) as error:  # not found, not a BERT, unreadable weights
        raise SystemExit(f"error: --model_name_or_path {args.model_name_or_path or default_base_model()}: {error}") from None
    model.config.max_seq_length = args.max_seq_length  # sentence-transformers encodes at the training length
    if args.attention_dropout is not None:
        set_attention_dropout(model, args.attention_dropout)
    domains = model.config.domains  # ids by the model's own order, whatever the order of --dataset flags
    try:
        train_pairs, known_pairs = training_pairs(datasets, domains, args.hard_negatives, args.seed)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        stems = open_stem_states(model, tokenizer, datasets, train_pairs, args, accelerator) if args.reuse_stem_states else None
    except ValueError as error:  # stored states cut short
        raise SystemExit(f"error: {error}") from None
    dataloader = train_dataloader(train_pairs, model, tokenizer, args, accelerator.num_processes, stems)
    if args.guide_false_negatives:  # the untrained model guides: its vectors of every train text, once
        known_pairs.set_guide(guide_vectors(model, tokenizer, train_pairs, known_pairs, args, stems))
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
    experts = BestExperts(args.metric_for_best_model) if args.select_experts_per_domain else None
    if experts is not None:
        accelerator.register_for_checkpointing(experts)
    evaluation = functools.partial(
        evaluate_and_keep_best, accelerator, model, tokenizer, datasets, args, best=best, experts=experts, stems=stems
    )
    step, start_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        found = checkpoints(output_dir)
        path = max(found, key=checkpoint_step) if args.resume_from_checkpoint == "latest" and found else None
        path = path or (Path(args.resume_from_checkpoint) if args.resume_from_checkpoint != "latest" else None)
        if path is None:  # a restart script's first run: say so rather than start over unnoticed
            accelerator.print(f"--resume_from_checkpoint latest: no checkpoint-<step>/ in {output_dir} yet, starting at step 0")
        else:
            step = resumed_step(path)
            check_checkpoint_fits(path, accelerator.unwrap_model(model))
            accelerator.load_state(str(path))
            accelerator.print(f"resumed from {path} at step {step}, learning rate {scheduler.get_last_lr()[0]:.6e}")
            start_epoch = step // updates_per_epoch
            skip_batches = (step % updates_per_epoch) * args.gradient_accumulation_steps

    # the card is published with the model: no token, no path of this machine (the embedded sample by its place in
    # this repository)
    public_args = {k: public_arg(v) for k, v in vars(args).items() if k != "hub_token"}
    sources = {d: public_name(src) for d, src in specs.items()} if args.dataset else {
        d: f"data/{SAMPLE_DIR.name}/{d}" for d in specs}
    card = {"domains": domains, "datasets": sources, "args": public_args, "step": step, "metrics": {}}
    if step:  # the metrics as they were at the checkpoint
        card = {**json.loads((path / "model" / "training_state.json").read_text()), "args": public_args}
    else:
        evaluation(card)  # the untrained baseline
    last_evaluated, stop_early = step, False

    first_step = step + 1
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
                evaluation(card)
                last_evaluated, stop_early = step, accelerator.check_trigger()
            if args.checkpointing_steps and args.checkpointing_steps.isdigit() and step % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args, pusher)
            if stop.agreed(accelerator):
                if not (output_dir / f"checkpoint-{step}").is_dir():
                    save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args, pusher)
                progress.close()
                raise TrainingStopped(stop.signum, step, output_dir / f"checkpoint-{step}")
            if step >= max_steps or stop_early:
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, tokenizer, output_dir, step, card, args, pusher)
        if step >= max_steps or stop_early:
            break
    progress.close()
    accelerator.print(f"trained steps {first_step}..{step} in this run" if step >= first_step else "no step left to train")

    if last_evaluated != step:
        evaluation(card)
    if experts is not None:
        assemble_best_experts(accelerator, accelerator.unwrap_model(model), tokenizer, datasets, args, card, experts, stems)
    if accelerator.is_main_process:
        with saving(output_dir):
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


def evaluate_and_keep_best(accelerator, model, tokenizer, datasets, args, card: dict, best: BestModel, experts=None,
                           stems=None):
    """Score valid (every process encodes a share); on the main process keep the best model in
    OUTPUT_DIR/best_model; tell every process when patience has run out (accelerator's trigger, so all of them stop
    at the same step). With per-domain selection, every process also keeps each domain's best expert."""
    metrics = evaluate(accelerator.unwrap_model(model), tokenizer, datasets, args, accelerator, stems)
    improved_domains = experts.update(accelerator.unwrap_model(model), metrics, card["step"]) if experts else []
    if accelerator.is_main_process:
        step = card["step"]
        card["metrics"] = {**metrics, "step": step}
        summary = metric_summary(card["metrics"])
        print(f"step {step} valid: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        if improved_domains and step:
            print(f"  best {experts.metric} so far for {', '.join(improved_domains)}")
        if args.with_tracking:
            accelerator.log({f"valid/{k}": v for k, v in summary.items()}, step=step)
        improved = best.update(card["metrics"], step)
        card["best"] = best.state_dict()
        if improved:
            with saving(Path(args.output_dir) / BEST_MODEL_DIR):
                save_model(accelerator.unwrap_model(model), tokenizer, Path(args.output_dir) / BEST_MODEL_DIR, card)
        elif best.should_stop():
            print(f"early stopping: no better valid {best.metric} in {best.stale} evaluations (best: step {best.step})")
            accelerator.set_trigger()
    accelerator.wait_for_everyone()


def guide_vectors(model, tokenizer, train_pairs, known_pairs, args, stems) -> torch.Tensor:
    """The model's embedding of every train text id (by the domain of a pair it occurs in)."""
    texts = {}
    columns = [c for c in ("domain_id", "a", "b", "id_a", "id_b", "hard", "id_hard") if c in train_pairs.column_names]
    for row in train_pairs.select_columns(columns):
        pairs = zip([row["a"], row["b"], *row.get("hard", [])], [row["id_a"], row["id_b"], *row.get("id_hard", [])])
        for text, text_id in pairs:
            texts.setdefault(text_id, (row["domain_id"], text))
    if stems is not None:
        encoder = StemEncoder(model, stems, args.per_device_eval_batch_size)
    else:
        encoder = TransformerEncoder(model, tokenizer, args.max_seq_length, args.per_device_eval_batch_size)
    vectors = torch.zeros(known_pairs.num_texts, model.config.hidden_size)
    model.eval()
    for domain_id, domain in enumerate(model.config.domains):
        ids = [i for i, (d, _) in texts.items() if d == domain_id]
        if ids:
            vectors[ids] = torch.from_numpy(encoder.encode([texts[i][1] for i in ids], domain))
    model.train()
    return vectors


def metric_summary(metrics: dict) -> dict:
    """The headline valid metrics: mean over domains, and pooled (`pooled_`)."""
    return {
        f"{prefix}{name}": metrics[key][name]
        for key, prefix in (("mean", ""), ("all", "pooled_"))
        for name in BASE_METRICS
        if name in metrics.get(key, {})
    }


def assemble_best_experts(accelerator, model, tokenizer, datasets, args, card: dict, experts: BestExperts, stems):
    """Give every domain its best expert on valid, then score the assembled model (its pooled figures are new)."""
    experts.assemble(model)
    card["expert_selection"] = {"metric": experts.metric, "kept": experts.best}
    card["metrics"] = {**evaluate(model, tokenizer, datasets, args, accelerator, stems), "step": card["step"]}
    if accelerator.is_main_process:
        kept = ", ".join(f"{d} step {b['step']}" for d, b in experts.best.items())
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metric_summary(card["metrics"]).items())
        print(f"experts selected per domain by valid {experts.metric} ({kept}); the assembled model's valid: {summary}")


def open_stem_states(model, tokenizer, datasets, train_pairs, args, accelerator) -> StemStates:
    """The stem states of every (domain, text) that training and validation read: built by the main process (or
    found from an earlier run with the same stem, data and length), then opened by every process."""
    inputs = set(zip(train_pairs["domain_id"], train_pairs["a"])) | set(zip(train_pairs["domain_id"], train_pairs["b"]))
    if "hard" in train_pairs.column_names:
        inputs |= {(d, t) for d, texts in zip(train_pairs["domain_id"], train_pairs["hard"]) for t in texts}
    for domain, dataset in datasets.items():
        d = model.config.domain_index(domain)
        inputs |= {(d, t) for t in list(dataset["valid"]["a"]) + list(dataset["valid"]["b"])}
    model.to(accelerator.device)
    build = functools.partial(
        StemStates.open_or_build, model, tokenizer, sorted(inputs), args.max_seq_length,
        Path(args.stem_cache_dir or Path(args.output_dir) / "stem-states"), accelerator.mixed_precision,
        args.per_device_eval_batch_size,
    )
    stems = build() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return stems or build(build=False)


if __name__ == "__main__":
    main()
