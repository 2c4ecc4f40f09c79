"""The record of a training run: what it trained on and how, how far it got, and how it scored on valid. Written as
`training_state.json` beside every saved model (final, best, each checkpoint's): the resume record, and what the
model card is made from. Every field may be published: sources and settings are named by moebert.names. And the
error of a checkpoint that cannot be resumed from."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moebert.names import TRAINING_STATE_FILE


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the problem and the fix."""


@dataclass
class TrainingState:
    domains: list[str]
    datasets: dict[str, str]  # domain -> its source, by a public name
    args: dict  # every setting of the run, as resolved (recipe and flags), by public names
    recipe: dict  # {"name", "reason", "flags": the settings given on the command line over the recipe's}
    step: int = 0
    metrics: dict = field(default_factory=dict)  # valid metrics of the latest evaluation, with its "step"
    best: dict | None = None  # the best-model record (moebert.training.selection.BestModel.state_dict)
    expert_selection: dict | None = None  # {"metric", "kept": {domain: {"value", "step"}}}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str) + "\n"

    @classmethod
    def load(cls, folder: Path) -> "TrainingState":
        """The state saved with the model in `folder`."""
        return cls(**json.loads((Path(folder) / TRAINING_STATE_FILE).read_text()))
