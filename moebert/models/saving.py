"""The one saver of a whole model folder, trained or composed: loadable with `AutoModel.from_pretrained(folder,
trust_remote_code=True)` and `SentenceTransformer(folder, trust_remote_code=True)`, with each domain's expert file
(for `model.load_expert` and composition), the model card and, for a trained model, its training state; swapped in
whole (moebert.atomic)."""

from pathlib import Path

from moebert.atomic import writing_folder
from moebert.names import TRAINING_STATE_FILE


def save_model(model, tokenizer, folder: Path, card: str, training_state: str | None = None) -> Path:
    """Write the model folder: weights, config (domains, calibration), tokenizer with the domain tokens, the
    sentence-transformers files, `experts/<DOMAIN>.safetensors` per domain (when each domain has its own expert),
    `README.md` (`card`) and `training_state.json` (`training_state`, when given)."""
    with writing_folder(Path(folder)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if model.config.num_experts == len(model.config.domains):  # each domain's experts alone, to compose by domain
            model.save_experts(tmp / "experts")
        if training_state is not None:
            (tmp / TRAINING_STATE_FILE).write_text(training_state)
        (tmp / "README.md").write_text(card)
    return Path(folder)
