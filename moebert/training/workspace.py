"""A training run's folders: the model folder, which holds the model and nothing else (what gets pushed), and the
workspace beside it, which holds everything else the run keeps.

    OUTPUT_DIR/                      the final model: loads with AutoModel, pushes as it is
    WORKSPACE_DIR/                   default OUTPUT_DIR-workspace
        checkpoint-<step>/           Accelerate's training state + model/ (a loadable model with its training state)
        best_model/                  the best model on valid so far
        stem-states/                 stored stem states (moebert.training.stem_states), named by their fingerprint
        hub-uploads/                 snapshots of uploads under way (moebert.models.hub)
        logs/                        tracking logs (--with_tracking)

Every model folder and checkpoint appears whole or not at all (moebert.atomic).
"""

import json
import shutil
from pathlib import Path

from moebert.atomic import recover_folder, replace_folder, temporary_folder, writing_folder
from moebert.models.card import card_repo, model_card
from moebert.models.saving import save_model as save_model_folder
from moebert.names import TRAINING_STATE_FILE
from moebert.training.state import CheckpointError, TrainingState


class Workspace:
    def __init__(self, output_dir, workspace_dir=None, stem_states_dir=None):
        self.output_dir = Path(output_dir).resolve()
        self.root = Path(workspace_dir).resolve() if workspace_dir else self.output_dir.with_name(
            f"{self.output_dir.name}-workspace")
        self.best_model_dir = self.root / "best_model"
        self.stem_states_dir = Path(stem_states_dir).resolve() if stem_states_dir else self.root / "stem-states"
        self.staging_dir = self.root / "hub-uploads"
        self.logs_dir = self.root / "logs"

    def recover(self) -> list[Path]:
        """Finish the model saves a kill cut short (see moebert.atomic); returns the folders put in place."""
        return [folder for folder in (self.output_dir, self.best_model_dir) if recover_folder(folder)]

    def checkpoint_dir(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def checkpoints(self) -> list[Path]:
        """The finished checkpoints, oldest first (one being written has another name)."""
        found = [p for p in self.root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=checkpoint_step)

    def resume_path(self, resume_from: str) -> Path | None:
        """The checkpoint `--resume_from_checkpoint` names: a folder, or `latest` (None when there is none yet)."""
        if resume_from != "latest":
            return Path(resume_from)
        found = self.checkpoints()
        return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def save_model(model, tokenizer, folder: Path, state: TrainingState):
    """A trained model's folder (moebert.models.saving) with its training state and the card made from it."""
    save_model_folder(model, tokenizer, folder, model_card(model.config, card_repo(state.args), state), state.to_json())


def copy_model(source: Path, folder: Path):
    """Make a saved model folder the model of `folder`, swapped in whole like save_model."""
    with writing_folder(folder) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def save_checkpoint(accelerator, model, tokenizer, workspace: Workspace, step: int, state: TrainingState,
                    total_limit: int | None) -> Path:
    """`checkpoint-<step>/`: the full training state (accelerator.save_state, every process its own part) and a
    loadable `model/` folder, written under a temporary name and renamed when complete; only the newest
    `total_limit` are kept (all with None or 0). Returns the checkpoint's folder."""
    final = workspace.checkpoint_dir(step)
    tmp = temporary_folder(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its part (its RNG state) before the rename
        if accelerator.is_main_process:
            save_model(accelerator.unwrap_model(model), tokenizer, tmp / "model", state)
            replace_folder(tmp, final)
            for old in workspace.checkpoints()[:-total_limit] if total_limit else []:
                shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint is no checkpoint; give its space back
        raise
    accelerator.wait_for_everyone()
    return final


def resumed_state(path: Path, model) -> TrainingState:
    """The training state of a checkpoint folder, by any name (`checkpoint-40`, the Hub's `last-checkpoint`), once
    checked to fit `model` (same base, domains and expert layers)."""
    if not (path / "model" / TRAINING_STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {path}: not a checkpoint written by train.py (no model/{TRAINING_STATE_FILE}); "
            "give a checkpoint-<step>/ folder, a downloaded last-checkpoint/, or 'latest'."
        )
    check_fits(path, json.loads((path / "model" / "config.json").read_text()), model.config)
    return TrainingState.load(path / "model")


def check_fits(path: Path, saved: dict, config):
    """Refuse, in one line, a checkpoint written for another model (other base, domains or expert layers)."""
    fields = ("domains", "moe_layers", "num_experts", "hidden_size", "num_hidden_layers", "vocab_size")
    differ = [f"{k}: checkpoint {saved.get(k)}, this run {getattr(config, k)}" for k in fields
              if saved.get(k) != getattr(config, k)]
    if differ:
        raise CheckpointError(f"--resume_from_checkpoint {path} was written for another model ({'; '.join(differ)}); "
                              "resume with the flags it was trained with, or start a new --output_dir.")
