"""Training recipes: each a named set of flag values, all in this one place. `--recipe auto` only picks one (full
where a CUDA or MPS device is found, quick on a CPU) and says why; a flag given on the command line always wins; no
value depends on another flag's value, and settings that cannot go together are refused with the flags to add.

- quick: experts in the top two layers only, trained alone on stored stem states, each domain keeping its best
  expert on valid: 750 steps of 16 pairs at 256 tokens at 1e-4, each domain's share of batches by its pairs to the
  power 0.5 so that small domains train too (both chosen on valid: docs/results.md); 11 to 17 minutes on a 2-core
  CPU with native bf16, about 26 in fp32 (docs/training.md).
- quick-base: the quick step for a base of BERT-base size (12 layers of 768: all-mpnet-base-v2, BERT-base), whose
  every step costs about four times MiniLM's per layer of experts: experts in the top layer alone, 500 steps,
  `valid` every 100; under an hour on a 2-core CPU in fp32 for all-mpnet-base-v2, the stored stem states included
  (58 minutes measured with another process beside it: docs/results.md).
- full: every layer's experts and all shared weights, one pass over the train pairs in batches of 32, bf16, the
  best model on valid kept: the settings chosen on valid on an H100 (docs/results.md).
"""

import torch

from moebert.device import cpu_forced

RECIPES = {
    "quick": {
        "max_train_steps": 750, "num_train_epochs": None, "per_device_train_batch_size": 16, "learning_rate": 1e-4,
        "max_seq_length": 256, "mixed_precision": "auto", "moe_layers": "top2", "attention_dropout": 0.0,
        "train_experts_only": True, "reuse_stem_states": True, "select_experts_per_domain": True,
        "load_best_model_at_end": False, "eval_steps": 75, "domain_sampling_alpha": 0.5,
    },
    "quick-base": {
        "max_train_steps": 500, "num_train_epochs": None, "per_device_train_batch_size": 16, "learning_rate": 5e-5,
        "max_seq_length": 256, "mixed_precision": "auto", "moe_layers": "top1", "attention_dropout": 0.0,
        "train_experts_only": True, "reuse_stem_states": True, "select_experts_per_domain": True,
        "load_best_model_at_end": False, "eval_steps": 100, "domain_sampling_alpha": 1.0,
    },
    "full": {
        "max_train_steps": None, "num_train_epochs": 1, "per_device_train_batch_size": 32, "learning_rate": 2e-5,
        "max_seq_length": 256, "mixed_precision": "bf16", "moe_layers": "all", "attention_dropout": None,
        "train_experts_only": False, "reuse_stem_states": False, "select_experts_per_domain": False,
        "load_best_model_at_end": True, "eval_steps": 100, "domain_sampling_alpha": 1.0,
    },
}
SETTINGS = tuple(RECIPES["quick"])


class RecipeError(ValueError):
    """Settings that cannot go together; the message names the flags that make them fit."""


def recipe_values(setting: str) -> str:
    """What each recipe sets `setting` to, for the flag's help."""
    return "; ".join(f"{name}: {values[setting]}" for name, values in RECIPES.items())


def device_recipe() -> tuple[str, str]:
    """The recipe for this machine, and why: a GPU trains everything on all pairs, a CPU the quick recipe."""
    if cpu_forced():
        return "quick", "ACCELERATE_USE_CPU is set"
    if torch.cuda.is_available():
        return "full", f"a CUDA device ({torch.cuda.get_device_name()}) is available"
    if torch.backends.mps.is_available():
        return "full", "an MPS device is available"
    return "quick", "no CUDA or MPS device (--recipe full is for a GPU)"


def apply_recipe(args, bf16_native: bool) -> dict:
    """Fill every recipe setting that was not given on the command line (absent from `args`) from `args.recipe`
    (`auto`: by device), check that the settings fit together, and return the record of it: {"name", "reason",
    "flags": the settings given over the recipe's}."""
    name, reason = device_recipe() if args.recipe == "auto" else (args.recipe, "asked for with --recipe")
    flags = {setting: getattr(args, setting) for setting in SETTINGS if hasattr(args, setting)}
    values = dict(RECIPES[name])
    if "num_train_epochs" in flags and "max_train_steps" not in flags:  # a length given in epochs replaces the recipe's
        values["max_train_steps"] = None
    if getattr(args, "specialist", None) and values["select_experts_per_domain"]:  # one model: the best one is kept
        values |= {"select_experts_per_domain": False, "load_best_model_at_end": True}
    for setting, value in values.items():
        if setting not in flags:
            setattr(args, setting, value)
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if bf16_native else "no"
    args.recipe = name
    check_fit(args, name)
    return {"name": name, "reason": reason, "flags": flags}


def check_fit(args, recipe: str):
    """Stem reuse and per-domain selection need the shared weights frozen; selection needs one expert per domain and
    picks the final model itself (a specialist keeps its best model instead); domain sampling shares out batches of
    one domain each, which mixed batching does not have."""
    alpha = args.domain_sampling_alpha
    if not alpha >= 0:  # NaN fails this too
        raise RecipeError(f"--domain_sampling_alpha {alpha}: give 0 or more (1: batches by pairs; 0: equal shares)")
    if alpha != 1 and args.batching == "mixed":
        raise RecipeError(f"--batching mixed has no per-domain batches to share by --domain_sampling_alpha {alpha} "
                          f"(recipe {recipe}): add --domain_sampling_alpha 1")
    if not args.train_experts_only:
        needing = [f"--no-{s}" for s in ("reuse_stem_states", "select_experts_per_domain") if getattr(args, s)]
        if needing:
            raise RecipeError(
                f"--no-train_experts_only: with the shared weights trained, neither stored stem states nor another "
                f"domain's score stay fixed; add {' '.join(needing)}" + (", or use --recipe full" if recipe != "full" else "")
            )
    if args.select_experts_per_domain and getattr(args, "specialist", None):
        raise RecipeError("--specialist trains one model, whose best on valid is kept (--load_best_model_at_end): "
                          "add --no-select_experts_per_domain")
    if args.select_experts_per_domain and (args.shared_expert or args.load_best_model_at_end):
        given = "--shared_expert" if args.shared_expert else "--load_best_model_at_end"
        raise RecipeError(f"{given}: per-domain expert selection (recipe {recipe}) needs one expert per domain and "
                          "picks the final model itself; add --no-select_experts_per_domain")


def describe(record: dict) -> str:
    """The first line a run prints: the recipe, why, and every setting given over it."""
    flags = " ".join(f"--{k} {v}" for k, v in record["flags"].items())
    return f"recipe {record['name']}: {record['reason']}; " + (f"given over it: {flags}" if flags else "no flag over it")
