"""The model card (README.md) of every model this project saves, trained (train.py) or composed (`python -m moebert
compose`): Hub metadata, what the model is, where experts loaded from expert files came from, usage, calibration,
training and validation when it was trained here, citation."""

import functools
import json
from pathlib import Path

from moebert.evaluation.metrics import BASE_METRICS
from moebert.names import local_copy, public_base_name

CARD_TEMPLATE = """
# {name}

{summary} Each text goes through its own domain's expert.

Domains: {domains}.
{sources}
## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{repo}", trust_remote_code=True)
embeddings = model.encode(["First abstract ...", "Second abstract ..."], prompt_name="{domain}")
```

```python
import torch
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
texts = model.prepend_domain_token(["First abstract ...", "Second abstract ..."], "{domain}")
with torch.no_grad():
    embeddings = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).pooler_output
```

One domain's experts alone: `experts/<DOMAIN>.safetensors`, loaded into a model of the same base with
`model.load_expert("{repo}", domain="{domain}", tokenizer=tokenizer)`, or composed with experts of other
publishers: `python -m moebert compose --base BASE --expert {repo}:{domain} --expert ORG/OTHER:DOMAIN ...`.
{calibration}{training}
## Citation

Hallee et al., *Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings*, arXiv:2401.15713
(2024); Scientific Reports (2025).
"""

TRAINING_TEMPLATE = """
## Training

{step} steps on: {datasets}. Validation (step {metrics_step}), {validation}.
{selection}

<details><summary>Training arguments</summary>

```json
{args}
```
</details>
"""

TAGS = ["moebert", "mixture-of-experts", "sentence-embeddings", "co-citation", "feature-extraction"]


def model_card(config, repo: str, training=None) -> str:
    """The README of a saved model: Hub metadata built with huggingface_hub's ModelCardData (base model, licence,
    tags; datasets and the valid metrics as model-index for a trained model), then the text. `repo`: the Hub id (or
    folder name) the usage shows; `training`: the run's TrainingState (moebert.training.state), None for a model
    composed from published experts."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base = public_base_name(config.base_model_name_or_path)
    text = CARD_TEMPLATE.format(
        name=Path(repo).name, summary=summary(config, base, composed=training is None), repo=repo,
        domains=", ".join(config.domains), domain=config.domains[0], sources=expert_sources(config),
        calibration=calibration_note(config), training=training_section(training) if training else "",
    )
    results = [
        EvalResult(task_type="sentence-similarity", dataset_type=f"co-citation-{domain}", dataset_name=source,
                   dataset_config=domain, dataset_split="valid", metric_type=metric,
                   metric_value=round(training.metrics[domain][metric], 4))
        for domain, source in (training.datasets.items() if training else ()) if domain in training.metrics
        for metric in ("roc_auc", "f1_max") if metric in training.metrics[domain]
    ]
    datasets = [s.split(":")[0] for s in training.datasets.values() if is_hub_id(s)] if training else []
    data = ModelCardData(
        base_model=base, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        license=base_licence(base), datasets=datasets or None, tags=TAGS + ([] if training else ["composed"]),
        model_name=Path(repo).name, eval_results=results or None,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))


def summary(config, base: str | None, composed: bool) -> str:
    layers = "every layer" if len(config.moe_layers) == config.num_hidden_layers else (
        f"layer{'s' if len(config.moe_layers) > 1 else ''} {', '.join(map(str, config.moe_layers))} of "
        f"{config.num_hidden_layers}")
    blocks = f"the feed-forward blocks of {f'[{base}](https://huggingface.co/{base})' if base else 'a local BERT'} " \
             f"({layers})"
    if composed:
        return (f"A MoE-BERT sentence encoder composed from domain experts published separately: {blocks} as one "
                "expert per domain, each loaded from its publisher's expert file.")
    return (f"A MoE-BERT sentence encoder: {blocks} copied into one expert per domain and trained contrastively "
            "(multiple negatives ranking loss) on co-cited abstracts with MoEBERT's `train.py`.")


def expert_sources(config) -> str:
    """Where the experts loaded from expert files came from, and a warning for those trained on other shared weights
    (for those domains the model computes something their publishers did not measure)."""
    sources = config.expert_sources or {}
    if not sources:
        return ""
    rows = "\n".join(f"| {domain} | {sources[domain]['source']} | {sources[domain].get('revision') or ''} | "
                     f"{sources[domain].get('shared_weights', '')} |" for domain in config.domains if domain in sources)
    other = [d for d, s in sources.items() if s.get("shared_weights") == "other"]
    warning = (f"\n**The experts of {', '.join(other)} were trained on other shared weights than this model's** "
               "(loaded with `--allow_other_shared_weights`): for those domains this model computes something their "
               "publishers did not measure.\n") if other else ""
    return ("\nExperts loaded from expert files; for every domain whose experts were trained on the same shared "
            "weights, the model computes what its publisher's model computed:\n\n"
            "| domain | expert file from | revision | shared weights |\n|---|---|---|---|\n" + rows + "\n" + warning)


def calibration_note(config) -> str:
    if not (config.calibration or {}).get("parameters"):
        return ""
    return ("\nCo-citation probabilities: `model.cocitation_probability(cosine, \"DOMAIN\")` maps a cosine to the "
            "probability that the two texts are co-cited, per domain (Platt scaling fitted on the valid pairs, co-cited "
            "and random in equal numbers), so one threshold means the same in every domain.\n")


def training_section(state) -> str:
    metrics = state.metrics
    validation = "; ".join(
        f"{label}: " + ", ".join(f"{k} {metrics[key][k]:.4f}" for k in BASE_METRICS if k in metrics.get(key, {}))
        for key, label in (("mean", "mean over domains"), ("all", "pooled"))
    )
    selection = ""
    if state.expert_selection:
        chosen = state.expert_selection
        kept = ", ".join(f"{d}: step {b['step']} ({b['value']:.4f})" for d, b in chosen["kept"].items())
        selection = (
            f"\nEach domain keeps its expert from the evaluation that scored best on its own valid pairs (valid "
            f"{chosen['metric']} in brackets; step 0 is the base's untrained feed-forward block): {kept}.\n"
        )
    return TRAINING_TEMPLATE.format(step=state.step, datasets=state.datasets, metrics_step=metrics.get("step", state.step),
                                    validation=validation, selection=selection,
                                    args=json.dumps(state.args, indent=2, default=str))


def card_repo(args: dict) -> str:
    """What a trained model's card calls it: its Hub repo, else its folder's name."""
    return args.get("hub_model_id") or Path(args["output_dir"]).name


def is_hub_id(source: str) -> bool:
    return not Path(source.split(":")[0]).exists() and source.count("/") == 1 and not source.startswith((".", "/"))


@functools.lru_cache
def base_licence(base: str | None) -> str | None:
    """The licence in the base model's own card (local folder or Hub), else None."""
    from huggingface_hub import ModelCard

    if not base:
        return None
    try:
        folder = Path(local_copy(base))
        card = ModelCard.load(folder / "README.md") if (folder / "README.md").is_file() else ModelCard.load(base)
        return card.data.license
    except Exception:  # no card, no network: the card then names no licence rather than a wrong one
        return None
