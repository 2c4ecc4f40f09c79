"""The model card (README.md) of a saved model: Hub metadata, usage, training and validation, citation."""

import functools
import json
from pathlib import Path

from moebert.metrics import BASE_METRICS
from moebert.names import local_copy, public_name
from moebert.training_state import TrainingState


CARD_TEMPLATE = """
# {model_name}

A MoE-BERT sentence encoder: the feed-forward blocks of {base} ({layers}) copied into one
expert per domain and trained contrastively (multiple negatives ranking loss) on co-cited abstracts with
MoEBERT's `train.py`. Each text goes through its own domain's expert.

Domains: {domains}.

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
{calibration}
## Training

{step} steps on: {datasets}. Validation (step {metrics_step}), {validation}.
{selection}

<details><summary>Training arguments</summary>

```json
{args}
```
</details>

## Citation

Hallee et al., *Contrastive Learning and Mixture of Experts Enables Precise Vector Embeddings*, arXiv:2401.15713
(2024); Scientific Reports (2025).
"""


def model_card(state: TrainingState, config) -> str:
    """The README of a saved model: Hub metadata (base model, licence, datasets, valid metrics as model-index)
    built with huggingface_hub's ModelCardData, then usage, training and citation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    metrics, base = state.metrics, public_name(config.base_model_name_or_path)
    name = Path(state.args.get("hub_model_id") or state.args["output_dir"]).name
    results = [
        EvalResult(task_type="sentence-similarity", dataset_type=f"co-citation-{domain}", dataset_name=source,
                   dataset_config=domain, dataset_split="valid", metric_type=metric,
                   metric_value=round(metrics[domain][metric], 4))
        for domain, source in state.datasets.items() if domain in metrics
        for metric in ("roc_auc", "f1_max") if metric in metrics[domain]
    ]
    data = ModelCardData(
        base_model=base, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        license=base_licence(base), datasets=[s.split(":")[0] for s in state.datasets.values() if is_hub_id(s)] or None,
        tags=["moebert", "mixture-of-experts", "sentence-embeddings", "co-citation", "feature-extraction"],
        model_name=name, eval_results=results or None,
    )
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
    calibration = ""
    if (getattr(config, "calibration", None) or {}).get("parameters"):
        calibration = (
            "\nCo-citation probabilities: `model.cocitation_probability(cosine, \"DOMAIN\")` maps a cosine to the "
            "probability that the two texts are co-cited, per domain (Platt scaling fitted on the valid pairs, co-cited "
            "and random in equal numbers), so one threshold means the same in every domain.\n"
        )
    layers = "every layer" if len(config.moe_layers) == config.num_hidden_layers else (
        f"layer{'s' if len(config.moe_layers) > 1 else ''} {', '.join(map(str, config.moe_layers))} of "
        f"{config.num_hidden_layers}")
    text = CARD_TEMPLATE.format(
        model_name=name, base=f"[{base}](https://huggingface.co/{base})" if is_hub_id(base or "") else f"`{base}`",
        repo=state.args.get("hub_model_id") or name, domains=", ".join(state.domains), domain=state.domains[0],
        step=state.step, datasets=state.datasets, metrics_step=metrics.get("step", state.step), layers=layers,
        validation=validation, selection=selection, calibration=calibration,
        args=json.dumps(state.args, indent=2, default=str),
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))


def is_hub_id(source: str) -> bool:
    return not Path(source.split(":")[0]).exists() and source.count("/") == 1 and not source.startswith((".", "/"))


@functools.lru_cache
def base_licence(base: str | None) -> str | None:
    """The licence in the base model's own card (local folder or Hub), else None."""
    from huggingface_hub import ModelCard

    try:
        folder = Path(local_copy(base) or "")
        card = ModelCard.load(folder / "README.md") if (folder / "README.md").is_file() else ModelCard.load(base)
        return card.data.license
    except Exception:  # no card, no network: the card then names no licence rather than a wrong one
        return None
