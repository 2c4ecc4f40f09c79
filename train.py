"""Contrastive training of MoE-BERT on co-cited abstract pairs, with Accelerate.

    python train.py                                   # embedded sample and base model: 11 to 26 min on 2 cores
    accelerate launch train.py --recipe full          # the same data, all train pairs at 256 tokens: a GPU
    python train.py --model_name_or_path sentence-transformers/all-mpnet-base-v2 --recipe quick-base \
        --output_dir outputs/moebert-mpnet            # a stronger base on a CPU: under an hour
    python train.py --specialist Nelson_2002          # strategy 1: one model for one domain, to outputs/specialists/
    accelerate launch train.py --model_name_or_path allenai/scibert_scivocab_uncased \
        --dataset CVD=GleghornLab/abstract_domain_cvd --dataset COPD=GleghornLab/abstract_domain_copd \
        --per_device_train_batch_size 32 --output_dir outputs/moebert

Each positive pair (a, b) of a domain gets the domain token in front of both texts and trains that domain's
expert with the Multiple Negatives Ranking loss: the other pairs of the batch are the negatives. With several
processes the embeddings of every process are gathered with their gradients, so each process scores its pairs
against the global batch and the update equals that of one process on the global batch. The model goes to
OUTPUT_DIR and nothing else does: checkpoints, the best model and stored stem states go to the workspace beside it.

With --specialist DOMAIN the run trains one model for that domain alone (the paper's strategy 1, domain-specific
fine-tuning): the layers the recipe would split into experts train whole, attention included, since nothing is
shared, and the best model on the domain's valid pairs is kept. A folder holding one specialist per domain
(outputs/specialists/ by default) is one model to eval.py and search.py: each domain's texts go to its own.
"""

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from configuration_moebert import usable_positions
from moebert.data.pairs import SAMPLE_DIR, DatasetError, load_domain_datasets, parse_dataset_specs
from moebert.device import ProcessGroupError, bf16_is_native, check_process_group, default_device
from moebert.evaluation.calibration import fit_calibration
from moebert.evaluation.metrics import BASE_METRICS, metric_summary
from moebert.evaluation.scoring import validate
from moebert.logs import show_logs
from moebert.models.builder import build_model
from moebert.models.hub import HubPusher, push_refusal
from moebert.names import DEFAULT_OUTPUT_DIR, SPECIALISTS_DIR, default_base_model, public_arg, public_name
from moebert.training import setup
from moebert.training.batches import make_collate, train_dataloader, training_pairs
from moebert.training.losses import backward_step
from moebert.training.preemption import StopRequest, TrainingStopped, resume_command
from moebert.training.recipes import RECIPES, RecipeError, apply_recipe, describe, recipe_values
from moebert.training.selection import BestExperts, BestModel
from moebert.training.state import CheckpointError, TrainingState
from moebert.training.stem_states import StemStates
from moebert.training.workspace import Workspace, copy_model, resumed_state, save_checkpoint, save_model

BEST_MODEL_METRICS = BASE_METRICS + tuple(f"pooled_{m}" for m in BASE_METRICS)
RECIPE = argparse.SUPPRESS  # a setting of the recipes: absent from the parsed flags unless given (moebert.training.recipes)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="auto", choices=["auto", *RECIPES], help="the values of the settings "
                        "marked 'recipe' below (moebert/training/recipes.py); auto: full with a CUDA or MPS device, "
                        "else quick; quick-base: a CPU and a base of BERT-base size (all-mpnet-base-v2). A flag given "
                        "explicitly always wins")
    add_model_arguments(parser)
    add_loop_arguments(parser)
    add_evaluation_arguments(parser)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.specialist and args.shared_expert:
        parser.error("--specialist trains one model for one domain: --shared_expert has nothing to share; drop it")
    args.output_dir = args.output_dir or str(SPECIALISTS_DIR / args.specialist if args.specialist else DEFAULT_OUTPUT_DIR)
    try:
        args.recipe_record = apply_recipe(args, bf16_is_native(default_device()))
    except RecipeError as error:
        parser.error(str(error))
    if Path.cwd().resolve().is_relative_to(Path(args.output_dir).resolve()):
        parser.error("--output_dir must not be the working directory or hold it: the final model is swapped in as a "
                     "whole folder; name a folder below it, e.g. --output_dir outputs/moebert")
    refusal = push_refusal(args.push_to_hub, args.hub_model_id)
    if refusal:
        parser.error(refusal)
    return args


def add_model_arguments(parser):
    parser.add_argument("--model_name_or_path", default=None, help="a BERT, RoBERTa or MPNet to upcycle (its kind read "
                        "from its config), or a MoE-BERT checkpoint (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--moe_layers", default=RECIPE, help="layers split into experts: all | upper | topN | middle | "
                        f"0,5,11 (recipe: {recipe_values('moe_layers')})")
    parser.add_argument("--shared_expert", action="store_true", help="one expert for all domains (baseline)")
    parser.add_argument("--specialist", default=None, metavar="DOMAIN", help="train one model on DOMAIN's pairs alone "
                        "(strategy 1): the layers --moe_layers names train whole, attention included; the best model on "
                        "valid is kept; default output: outputs/specialists/DOMAIN")
    parser.add_argument("--train_experts_only", action=argparse.BooleanOptionalAction, default=RECIPE, help="freeze "
                        "the shared weights (embeddings, attention, LayerNorm): training a domain then changes only its "
                        f"own expert (recipe: {recipe_values('train_experts_only')})")
    parser.add_argument("--reuse_stem_states", action=argparse.BooleanOptionalAction, default=RECIPE, help="with "
                        "--train_experts_only: compute everything below the first MoE layer's experts once per text, "
                        f"without dropout, and train from there (recipe: {recipe_values('reuse_stem_states')})")
    parser.add_argument("--select_experts_per_domain", action=argparse.BooleanOptionalAction, default=RECIPE,
                        help="with --train_experts_only and one expert per domain: each domain keeps its expert from "
                        "the evaluation that scored best on its own valid pairs (the untrained one included) and the "
                        f"final model is assembled from them (recipe: {recipe_values('select_experts_per_domain')})")
    parser.add_argument("--attention_dropout", type=float, default=RECIPE, help="dropout on the attention "
                        "probabilities; with 0 a CPU keeps its fused attention in training (a 256-token forward 2.7x "
                        f"faster) (recipe: {recipe_values('attention_dropout')}, None: the model's own)")
    parser.add_argument("--max_seq_length", type=int, default=RECIPE, help=f"(recipe: {recipe_values('max_seq_length')})")
    parser.add_argument("--hard_negatives", type=int, default=1, help="per pair, this many abstracts of the same "
                        "domain's train split co-cited with neither text, as extra candidates of the loss")
    parser.add_argument("--mask_false_negatives", action=argparse.BooleanOptionalAction, default=True, help="leave out "
                        "of the loss in-batch negatives that are the anchor's own text, its positive's text or a known "
                        "co-cited partner")


def add_loop_arguments(parser):
    parser.add_argument("--max_train_steps", type=int, default=RECIPE, help="optimizer steps; given, it overrides "
                        f"--num_train_epochs (recipe: {recipe_values('max_train_steps')})")
    parser.add_argument("--num_train_epochs", type=int, default=RECIPE, help="passes over the train pairs (recipe: "
                        f"{recipe_values('num_train_epochs')})")
    parser.add_argument("--per_device_train_batch_size", type=int, default=RECIPE, help="pairs per process and step; "
                        "every other pair of the global batch is a negative (recipe: "
                        f"{recipe_values('per_device_train_batch_size')})")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--batching", default="domain", choices=["mixed", "domain"], help="domain: every (global) "
                        "batch from one domain, so the in-batch negatives are same-domain abstracts (harder)")
    parser.add_argument("--domain_sampling_alpha", type=float, default=RECIPE, help="--batching domain: each domain's "
                        "share of the batches is its train pairs to this power; 1: every pair once an epoch; below 1, "
                        "small domains get more batches (their pairs repeat) and large ones fewer (recipe: "
                        f"{recipe_values('domain_sampling_alpha')})")
    parser.add_argument("--learning_rate", type=float, default=RECIPE, help=f"(recipe: {recipe_values('learning_rate')})")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--scale", type=float, default=20.0, help="cosine similarity scale of the loss")
    parser.add_argument("--cached_mini_batch_size", type=int, default=0, help="GradCache: embed the batch in "
                        "mini-batches of this size, so a large batch fits in the memory of a small one with the same "
                        "gradients (0: a plain step)")
    parser.add_argument("--mixed_precision", default=RECIPE, choices=["no", "fp16", "bf16", "auto"], help="auto: bf16 "
                        f"where the device computes it natively, else no (recipe: {recipe_values('mixed_precision')})")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward "
                        "pass: less memory for large bases or long inputs, about a third more compute")
    parser.add_argument("--ddp_timeout", type=int, default=1800, help="seconds a collective may wait (several "
                        "processes), e.g. the others while the main process writes a checkpoint")
    parser.add_argument("--seed", type=int, default=42)


def add_evaluation_arguments(parser):
    parser.add_argument("--eval_steps", type=int, default=RECIPE, help="evaluate on valid every N steps (always "
                        f"before training and at the end; recipe: {recipe_values('eval_steps')})")
    parser.add_argument("--metric_for_best_model", default="roc_auc", choices=BEST_MODEL_METRICS, help="valid metric "
                        "of the best model: the mean over domains, or with pooled_ all domains' pairs together")
    parser.add_argument("--load_best_model_at_end", action=argparse.BooleanOptionalAction, default=RECIPE,
                        help=f"the final model is the best one (recipe: {recipe_values('load_best_model_at_end')})")
    parser.add_argument("--early_stopping_patience", type=int, default=None, help="stop after N evaluations without "
                        "improvement")


def add_output_arguments(parser):
    parser.add_argument("--output_dir", default=None, help="the final model, and nothing else (default: "
                        f"{DEFAULT_OUTPUT_DIR}, or with --specialist {SPECIALISTS_DIR}/DOMAIN)")
    parser.add_argument("--workspace_dir", default=None, help="checkpoints, the best model, stored stem states and "
                        "upload snapshots (default: OUTPUT_DIR-workspace)")
    parser.add_argument("--stem_cache_dir", default=None, help="stored stem states, named by their fingerprint: runs "
                        "that share one (same stem, data, length) compute the states once (default: "
                        "WORKSPACE_DIR/stem-states)")
    parser.add_argument("--checkpointing_steps", default=None, help="N or 'epoch'")
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help="PATH or 'latest'")
    parser.add_argument("--with_tracking", action="store_true")
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--push_to_hub", action="store_true", help="push the model to the Hub repo --hub_model_id")
    parser.add_argument("--hub_model_id", default=None, help="ORG/NAME")
    parser.add_argument("--hub_strategy", default="every_save", choices=["end", "every_save", "checkpoint"], help="end: "
                        "the final model only; every_save: also each checkpoint's model; checkpoint: also the full "
                        "training state of the latest checkpoint, under last-checkpoint/ (resume it on another machine)")
    parser.add_argument("--push_experts", default="all", choices=["all", "trained"], help="the expert files pushed under "
                        "experts/: all domains', or only those of the domains this run trained (one group's "
                        "contribution of a domain to a published model, for others to compose)")
    parser.add_argument("--hub_private_repo", action="store_true")
    parser.add_argument("--hub_token", default=None, help="default: the token saved by `hf auth login` or HF_TOKEN")
    parser.add_argument("--stop_timeout", type=float, default=60, help="on SIGTERM/SIGINT: seconds to wait for queued "
                        "Hub uploads after the checkpoint is written (a preempted machine has little time left)")


# ------------------------------------------------------------------------------------------------ setting up


@dataclass
class Run:
    """What the loop works with, set up by `prepare`."""

    model: torch.nn.Module
    tokenizer: object
    datasets: dict
    known_pairs: object
    stems: StemStates | None
    dataloader: object
    batch_sampler: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    best: BestModel
    experts: BestExperts | None
    max_steps: int
    updates_per_epoch: int


def prepare(args, accelerator: Accelerator, workspace: Workspace) -> Run:
    with refused(DatasetError):
        specs = trained_specs(args)
        datasets = load_domain_datasets(specs)
    with refused((OSError, ValueError), f"--model_name_or_path {args.model_name_or_path or default_base_model()}: "):
        model, tokenizer = build_model(args.model_name_or_path or default_base_model(), list(specs), args.moe_layers,
                                       1 if args.shared_expert else None)  # not found, not a BERT, unreadable weights
    check_length(args.max_seq_length, model.config)
    setup.train_only(model, trained_weights(args))  # before the stem states: they end below the first trained weight
    model.config.max_seq_length = args.max_seq_length  # sentence-transformers encodes at the training length
    if args.attention_dropout is not None:
        setup.set_attention_dropout(model, args.attention_dropout)
    domains = model.config.domains  # ids by the model's own order, whatever the order of --dataset flags
    for domain in specs:  # experts about to be trained are no longer the ones an expert file gave
        (model.config.expert_sources or {}).pop(domain, None)
    with refused(DatasetError):
        train_pairs, known_pairs = training_pairs(datasets, domains, args.hard_negatives, args.seed)
    with refused(ValueError):  # stored states cut short
        stems = open_stem_states(model, tokenizer, datasets, train_pairs, args, accelerator, workspace)
    collate = make_collate(model, tokenizer, args.max_seq_length, stems)
    dataloader = train_dataloader(train_pairs, collate, args.batching, args.per_device_train_batch_size,
                                  accelerator.num_processes, args.seed, args.domain_sampling_alpha)
    batch_sampler = dataloader.batch_sampler  # before prepare(), which may wrap it
    if args.gradient_checkpointing:  # recompute activations in the backward pass: less memory, more compute
        model.activation_checkpointing_enable({"use_reentrant": False})
    optimizer = setup.make_optimizer(model, args.learning_rate, args.weight_decay)
    if accelerator.ddp_handler is not None:
        accelerator.ddp_handler.find_unused_parameters = setup.experts_can_miss_a_step(model)
    updates_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(args.warmup_ratio * max_steps) * accelerator.num_processes, max_steps * accelerator.num_processes
    )
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    best = BestModel(args.metric_for_best_model, args.early_stopping_patience)
    accelerator.register_for_checkpointing(best)  # saved and restored with the rest of the training state
    experts = BestExperts(args.metric_for_best_model) if args.select_experts_per_domain else None
    if experts is not None:
        accelerator.register_for_checkpointing(experts)
    return Run(model, tokenizer, datasets, known_pairs if args.mask_false_negatives else None, stems, dataloader,
               batch_sampler, optimizer, scheduler, best, experts, max_steps, updates_per_epoch)


def trained_specs(args) -> dict:
    """{domain: source} of the domains this run trains: those of --dataset (default: the embedded sample), or with
    --specialist that one."""
    specs = parse_dataset_specs(args.dataset)
    if args.specialist is None:
        return specs
    if args.specialist not in specs:
        raise DatasetError(f"--specialist {args.specialist}: not one of the domains {list(specs)}; name one of them "
                           "(or add it with --dataset DOMAIN=SOURCE)")
    return {args.specialist: specs[args.specialist]}


def trained_weights(args) -> str:
    """What trains (moebert.training.setup.train_only): with --train_experts_only the experts alone, or for a
    specialist, whose nothing is shared, the layers that hold them whole; else everything."""
    if not args.train_experts_only:
        return "all"
    return "moe_layers" if args.specialist else "experts"


def check_length(max_seq_length: int, config):
    """A text longer than the base's position embeddings would fail deep inside the first forward pass."""
    limit = usable_positions(config)
    if max_seq_length > limit:
        raise SystemExit(f"error: --max_seq_length {max_seq_length}: this {config.base_model_type} base takes at most "
                         f"{limit} tokens (its position embeddings); give --max_seq_length {limit} or less")


def open_stem_states(model, tokenizer, datasets, train_pairs, args, accelerator, workspace) -> StemStates | None:
    """With --reuse_stem_states, the stem states of every (domain, text) that training and validation read: built by
    the main process (or found from an earlier run with the same stem, data and length), then opened by every
    process."""
    if not args.reuse_stem_states:
        return None
    inputs = set(zip(train_pairs["domain_id"], train_pairs["a"])) | set(zip(train_pairs["domain_id"], train_pairs["b"]))
    if "hard" in train_pairs.column_names:
        inputs |= {(d, t) for d, texts in zip(train_pairs["domain_id"], train_pairs["hard"]) for t in texts}
    for domain, dataset in datasets.items():
        d = model.config.domain_index(domain)
        inputs |= {(d, t) for t in list(dataset["valid"]["a"]) + list(dataset["valid"]["b"])}
    model.to(accelerator.device)

    def open_states(build: bool) -> StemStates:
        return StemStates.open_or_build(model, tokenizer, sorted(inputs), args.max_seq_length, workspace.stem_states_dir,
                                        accelerator.mixed_precision, args.per_device_eval_batch_size, build)

    stems = open_states(build=True) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return stems or open_states(build=False)


def start(args, accelerator: Accelerator, workspace: Workspace, run: Run) -> tuple[int, TrainingState]:
    """The step to start at and the run's state: a checkpoint's when resuming (its Accelerate state restored), else
    a fresh one scored on valid before any training (the untrained baseline)."""
    path = workspace.resume_path(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    public_args = {k: public_arg(v) for k, v in vars(args).items() if k not in ("hub_token", "recipe_record")}
    if args.resume_from_checkpoint and path is None:  # a restart script's first run: say so, not start over unnoticed
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint-<step>/ in {workspace.root} yet, starting at "
                          "step 0")
    if path is not None:
        with refused(CheckpointError):
            state = resumed_state(path, accelerator.unwrap_model(run.model))
            accelerator.load_state(str(path))
        accelerator.print(f"resumed from {path} at step {state.step}, learning rate {run.scheduler.get_last_lr()[0]:.6e}")
        state.args, state.recipe = public_args, args.recipe_record
        return state.step, state
    sources = {d: public_name(src) if args.dataset else f"data/{SAMPLE_DIR.name}/{d}"  # the sample by its place here
               for d, src in trained_specs(args).items()}
    state = TrainingState(accelerator.unwrap_model(run.model).config.domains, sources, public_args, args.recipe_record)
    evaluate_and_keep_best(args, accelerator, workspace, run, state)
    return 0, state


# ------------------------------------------------------------------------------------------------ the loop


def train(args, accelerator: Accelerator, workspace: Workspace, pusher: HubPusher | None, stop: StopRequest):
    run = prepare(args, accelerator, workspace)
    if args.with_tracking:
        accelerator.init_trackers("moebert", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    step, state = start(args, accelerator, workspace, run)
    first_step, last_evaluated, stop_early = step + 1, step, False
    start_epoch, skip_batches = step // run.updates_per_epoch, (step % run.updates_per_epoch) * args.gradient_accumulation_steps
    progress = tqdm(total=run.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="training")
    run.model.train()
    stop.arm()  # a signal before this exits at once: there is no step to checkpoint
    for epoch in range(start_epoch, math.ceil(run.max_steps / max(run.updates_per_epoch, 1))):
        for sampler in (run.dataloader, run.batch_sampler):  # the same shuffle for each epoch in every run
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.dataloader, skip_batches) if skip_batches else run.dataloader
        skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(run.model):
                loss = backward_step(run.model, batch, accelerator, run.known_pairs, args.scale,
                                     args.cached_mini_batch_size)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step = state.step = step + 1
            loss_value, lr = loss.item(), run.scheduler.get_last_lr()[0]  # one device sync per step
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if args.with_tracking:
                accelerator.log({"train/loss": loss_value, "train/lr": lr}, step=step)
            if args.eval_steps and step % args.eval_steps == 0:
                evaluate_and_keep_best(args, accelerator, workspace, run, state)
                last_evaluated, stop_early = step, accelerator.check_trigger()
            if args.checkpointing_steps and args.checkpointing_steps.isdigit() and step % int(args.checkpointing_steps) == 0:
                checkpoint(args, accelerator, workspace, run, state, pusher)
            if stop.agreed(accelerator):
                if not workspace.checkpoint_dir(step).is_dir():
                    checkpoint(args, accelerator, workspace, run, state, pusher)
                progress.close()
                raise TrainingStopped(stop.signum, step, workspace.checkpoint_dir(step))
            if step >= run.max_steps or stop_early:
                break
        if args.checkpointing_steps == "epoch":
            checkpoint(args, accelerator, workspace, run, state, pusher)
        if step >= run.max_steps or stop_early:
            break
    progress.close()
    accelerator.print(f"trained steps {first_step}..{step} in this run" if step >= first_step else "no step left to train")
    if last_evaluated != step:
        evaluate_and_keep_best(args, accelerator, workspace, run, state)
    return finish(args, accelerator, workspace, run, state, pusher)


# ------------------------------------------------------------------------------------------------ evaluating, saving


def evaluate_and_keep_best(args, accelerator: Accelerator, workspace: Workspace, run: Run, state: TrainingState):
    """Score valid (every process encodes a share); on the main process keep the best model in the workspace's
    best_model/; tell every process when patience has run out (accelerator's trigger, so all of them stop at the
    same step). With per-domain selection, every process also keeps each domain's best expert."""
    model = accelerator.unwrap_model(run.model)
    metrics = validate_and_calibrate(model, args, accelerator, run)
    improved_domains = run.experts.update(model, metrics, state.step) if run.experts else []
    if accelerator.is_main_process:
        state.metrics = {**metrics, "step": state.step}
        summary = metric_summary(state.metrics)
        print(f"step {state.step} valid: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        if improved_domains and state.step:
            print(f"  best {run.experts.metric} so far for {', '.join(improved_domains)}")
        if args.with_tracking:
            accelerator.log({f"valid/{k}": v for k, v in summary.items()}, step=state.step)
        improved = run.best.update(state.metrics, state.step)
        state.best = run.best.state_dict()
        if improved:
            with saving(workspace.best_model_dir):
                save_model(model, run.tokenizer, workspace.best_model_dir, state)
        elif run.best.should_stop():
            print(f"early stopping: no better valid {run.best.metric} in {run.best.stale} evaluations (best: step "
                  f"{run.best.step})")
            accelerator.set_trigger()
    accelerator.wait_for_everyone()


def validate_and_calibrate(model, args, accelerator: Accelerator, run: Run) -> dict:
    """Valid metrics (every process encodes a share), then the model's calibration fitted on these valid scores, so
    that every model saved (best, checkpoint, final) carries the calibration of its own weights; with the shared
    weights frozen, the domains this run does not train keep theirs."""
    metrics, scored = validate(model, run.tokenizer, run.datasets, args.max_seq_length, args.per_device_eval_batch_size,
                               accelerator, run.stems)
    model.config.calibration = fit_calibration(scored, kept=model.config.calibration if args.train_experts_only else None)
    return metrics


def checkpoint(args, accelerator: Accelerator, workspace: Workspace, run: Run, state: TrainingState, pusher):
    """Write checkpoint-<step>/ and, by --hub_strategy, push its model to the root of the Hub repo and the whole
    checkpoint to last-checkpoint/."""
    with saving(workspace.checkpoint_dir(state.step)):
        folder = save_checkpoint(accelerator, run.model, run.tokenizer, workspace, state.step, state,
                                 args.checkpoints_total_limit)
    if pusher and args.hub_strategy in ("every_save", "checkpoint"):
        pusher.push(folder / "model", "", f"Training in progress, step {state.step}", pushed_files(folder / "model", args))
    if pusher and args.hub_strategy == "checkpoint":
        pusher.push(folder, "last-checkpoint", f"Checkpoint at step {state.step}")


def finish(args, accelerator: Accelerator, workspace: Workspace, run: Run, state: TrainingState, pusher):
    """With per-domain selection, give every domain its best expert and score the assembled model; then save the
    final model (or copy the best one) to OUTPUT_DIR and push it."""
    model = accelerator.unwrap_model(run.model)
    if run.experts is not None:
        run.experts.assemble(model)
        state.expert_selection = {"metric": run.experts.metric, "kept": run.experts.best}
        state.metrics = {**validate_and_calibrate(model, args, accelerator, run), "step": state.step}
        kept = ", ".join(f"{d} step {b['step']}" for d, b in run.experts.best.items())
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metric_summary(state.metrics).items())
        accelerator.print(f"experts selected per domain by valid {run.experts.metric} ({kept}); the assembled model's "
                          f"valid: {summary}")
    if accelerator.is_main_process:
        with saving(workspace.output_dir):
            if args.load_best_model_at_end and run.best.step not in (None, state.step):
                copy_model(workspace.best_model_dir, workspace.output_dir)
                print(f"best model (step {run.best.step}, valid {run.best.metric} {run.best.value:.4f}) saved to "
                      f"{workspace.output_dir}/")
            else:
                save_model(model, run.tokenizer, workspace.output_dir, state)
                print(f"model saved to {workspace.output_dir}/")
        if pusher:
            pusher.push(workspace.output_dir, "", "End of training", pushed_files(workspace.output_dir, args))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return state


def pushed_files(folder: Path, args) -> list[str]:
    """The files of a model folder that go to the Hub: all, or with --push_experts trained only the expert files of
    the domains this run trained."""
    trained = {f"experts/{domain}.safetensors" for domain in parse_dataset_specs(args.dataset)}
    files = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
    return [f for f in files if args.push_experts == "all" or not f.startswith("experts/") or f in trained]


@contextlib.contextmanager
def refused(errors, prefix: str = ""):
    """Input that cannot be used (data, model, checkpoint) ends the run in one line that says why."""
    try:
        yield
    except errors as error:
        raise SystemExit(f"error: {prefix}{error}") from None


@contextlib.contextmanager
def saving(what: Path):
    """A save that fails for want of space or rights ends the run in one line; what it half wrote is gone (see
    moebert.atomic) and nothing written before is lost."""
    try:
        yield
    except OSError as error:
        raise SystemExit(
            f"error: cannot write {what} ({error.strerror or error}); the model saved before and every finished "
            "checkpoint are intact. Free space (or fix the rights) and resume with --resume_from_checkpoint latest."
        ) from None


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    show_logs()
    args = parse_args(argv)
    workspace = Workspace(args.output_dir, args.workspace_dir, args.stem_cache_dir)
    tracking = {"log_with": args.report_to, "project_dir": str(workspace.logs_dir)} if args.with_tracking else {}
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[
            DistributedDataParallelKwargs(),  # find_unused_parameters is set once the model is known (prepare)
            # the other processes wait in a barrier while the main process writes checkpoints and the best model
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
        ],
        **tracking,
    )
    accelerator.print(describe(args.recipe_record))
    with refused(ProcessGroupError):
        check_process_group(accelerator.num_processes)
    if accelerator.is_main_process:
        for folder in workspace.recover():  # a swap of folders that a kill cut short
            print(f"{folder}: finished the model save a kill had interrupted")
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        pusher = HubPusher(args.hub_model_id, workspace.staging_dir, token=args.hub_token, private=args.hub_private_repo)
    return run_to_the_end(args, accelerator, workspace, pusher, sys.argv if argv is None else ["train.py", *argv])


def run_to_the_end(args, accelerator, workspace, pusher, argv: list[str]):
    """Train, and however training ends, settle the uploads: all of them after a finished run or a crash, a bounded
    wait after a stop signal (then exit 128 + the signal with the command that resumes)."""
    stop, completed = StopRequest(), False
    try:
        state = train(args, accelerator, workspace, pusher, stop)
        completed = True
        return state
    except TrainingStopped as stopped:
        abandoned = pusher.finish(completed=False, timeout=args.stop_timeout) if pusher else 0
        pusher = None
        accelerator.print(f"stopped by {stopped.name} after step {stopped.step}: checkpoint in {stopped.checkpoint}; "
                          f"resume with: {resume_command(argv)}", flush=True)
        if abandoned:  # the interpreter would wait at exit for the upload threads: leave without them
            sys.stderr.flush()
            os._exit(128 + stopped.signum)
        raise SystemExit(128 + stopped.signum) from None
    finally:  # also when training fails: what was queued is still sent, or reported
        stop.restore()
        if pusher:
            pusher.finish(completed=completed)


if __name__ == "__main__":
    main()
