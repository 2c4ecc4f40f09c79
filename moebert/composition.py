"""One model from domain experts that different people published: a base, upcycled, and each domain's expert file
loaded into it (checked to have been trained on the same shared weights), written as a complete model folder.

Two groups that upcycle the same base and train the experts alone (the quick recipe) leave the shared weights
exactly the base's; the composed model then computes, for each domain, exactly what its publisher's model computed.
"""

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from experts_moebert import read_expert_file, resolve_expert
from modeling_moebert import MoEBertModel
from moebert.atomic import writing_folder
from moebert.loading import is_moebert, load_moebert
from moebert.names import local_copy, public_name

CARD = """
# {name}

A MoE-BERT sentence encoder composed from domain experts published separately: the feed-forward blocks of
{base} ({layers}) as one expert per domain, each loaded from its publisher's expert file. Each text goes through its
own domain's expert; for every domain whose experts were trained on the same shared weights, the model computes what
its publisher's model computed.

| domain | expert file from | revision | shared weights |
|---|---|---|---|
{rows}
{warning}
## Usage

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{repo}", trust_remote_code=True)
embeddings = model.encode(["First abstract ...", "Second abstract ..."], prompt_name="{domain}")
```

Co-citation probabilities (each domain's calibration, from its expert file):
`model.cocitation_probability(cosine, "{domain}")` with `AutoModel.from_pretrained("{repo}", trust_remote_code=True)`.

Composed with `python -m moebert compose`. MoE-BERT after Hallee et al., *Contrastive Learning and Mixture of Experts
Enables Precise Vector Embeddings*, arXiv:2401.15713 (2024); Scientific Reports (2025).
"""


class CompositionError(ValueError):
    """Experts that cannot be composed as asked; the message names the problem and the fix."""


def parse_expert_spec(spec: str) -> tuple[str, str, str | None]:
    """`ORG/REPO:DOMAIN`, `ORG/REPO@REVISION:DOMAIN` or `path/to/DOMAIN.safetensors` -> (source, domain, revision)."""
    if Path(spec).is_file():
        return spec, read_expert_file(spec)[1]["domain"], None
    source, sep, domain = spec.rpartition(":")
    if not sep or not source or not domain:
        raise CompositionError(f"--expert {spec!r}: write ORG/REPO:DOMAIN (a Hub repo with experts/DOMAIN.safetensors) "
                               "or the path of an expert file.")
    source, _, revision = source.partition("@")
    return source, domain, revision or None


def compose(base: str, experts: list[str], allow_other_shared_weights: bool = False):
    """(model, tokenizer): `base` (a BERT, upcycled with the experts' layout, or a MoE-BERT) with each expert of
    `experts` (specs, see parse_expert_spec) loaded into its domain."""
    specs = [parse_expert_spec(spec) for spec in experts]
    domains = [domain for _, domain, _ in specs]
    duplicated = sorted({d for d in domains if domains.count(d) > 1})
    if duplicated:
        raise CompositionError(f"domains {duplicated} are given by more than one --expert: give each domain once.")
    files = {domain: resolve_expert(source, domain, revision) for source, domain, revision in specs}
    files = {domain: (path, provenance | ({"source": public_name(path)} if Path(path) == Path(source) else {}))
             for (source, _, _), (domain, (path, provenance)) in zip(specs, files.items())}  # a local file: as typed
    if is_moebert(local_copy(base)):
        model, tokenizer = load_moebert(local_copy(base))
    else:
        layers = json.loads(read_expert_file(files[domains[0]][0])[1]["moe_layers"])
        model, tokenizer = MoEBertModel.from_bert(local_copy(base), domains=domains, moe_layers=layers)
        model.config.base_model_name_or_path = public_name(base)
    for domain, (path, provenance) in files.items():
        model.load_expert(path, tokenizer=tokenizer, domain=domain, allow_other_shared_weights=allow_other_shared_weights)
        model.config.expert_sources[domain] |= provenance  # the Hub repo and commit, not the cache's file
    lengths = {int(read_expert_file(path)[1].get("max_seq_length", 0)) for path, _ in files.values()} - {0}
    if lengths:
        model.config.max_seq_length = min(lengths)  # what sentence-transformers encodes at
    return model, tokenizer


def save_composed(model, tokenizer, folder: Path, name: str) -> Path:
    """A complete model folder: weights, tokenizer with the domain tokens, sentence-transformers files and prompts,
    calibration in the config, every domain's expert file, and a card listing each expert's source."""
    with writing_folder(Path(folder)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.save_experts(tmp / "experts")
        (tmp / "README.md").write_text(composed_card(model.config, name))
    return Path(folder)


def composed_card(config, repo: str) -> str:
    sources = config.expert_sources or {}
    rows = "\n".join(f"| {domain} | {sources.get(domain, {}).get('source', 'the base')} | "
                     f"{sources.get(domain, {}).get('revision') or ''} | "
                     f"{sources.get(domain, {}).get('shared_weights', '')} |" for domain in config.domains)
    other = [d for d, s in sources.items() if s.get("shared_weights") == "other"]
    warning = (f"\n**The experts of {', '.join(other)} were trained on other shared weights than this model's** "
               "(loaded with `--allow_other_shared_weights`): for those domains this model computes something their "
               "publishers did not measure.\n") if other else ""
    base = public_name(config.base_model_name_or_path)
    layers = f"layers {', '.join(map(str, config.moe_layers))} of {config.num_hidden_layers}"
    text = CARD.format(name=Path(repo).name, base=f"`{base}`", layers=layers, rows=rows, warning=warning, repo=repo,
                       domain=config.domains[0])
    data = ModelCardData(base_model=base, library_name="sentence-transformers", pipeline_tag="sentence-similarity",
                         tags=["moebert", "mixture-of-experts", "sentence-embeddings", "co-citation", "composed"])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{text}"))
