"""Pair datasets bound to domains: the one loader of train.py, eval.py and the benchmarks, and the embedded sample
(its domains, its papers, samples of its training texts).

A source is a Hub dataset id (e.g. `GleghornLab/abstract_domain_cvd`, or `ORG/NAME:CONFIG` for one config of a
dataset pushed by `data/build.py --push_to_hub`), a folder written by
`DatasetDict.save_to_disk`, or a folder of per-split files `train.parquet` / `valid.csv` / `test.jsonl` ...
Every split holds the columns `a`, `b` (two abstracts) and `label` (1 co-cited, 0 not). Split files may be in any
format moebert.data.tables reads (`train.csv.gz`, ...).
"""

import functools
import logging
import random
from pathlib import Path

import pandas as pd
from datasets import DatasetDict, load_dataset, load_from_disk

from moebert.data.tables import split_name

logger = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "synergy"  # the embedded default, shipped in data/
SAMPLE_NAME = "the SYNERGY sample shipped in data/synergy"
SPLITS = ("train", "valid", "test")
REQUIRED_COLUMNS = ("a", "b", "label")
BUILDERS = {".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}),
            ".jsonl": ("json", {}), ".json": ("json", {})}  # datasets' reader of each table format


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the problem and the fix."""


def sample_specs() -> dict[str, str]:
    """The embedded default (SYNERGY): one domain per folder of `data/synergy/`, by name."""
    return {d.name: str(d) for d in sorted(SAMPLE_DIR.iterdir()) if d.is_dir()}


def sample_papers() -> pd.DataFrame:
    """Every paper of the embedded sample (all splits) once, by id: columns id, text, domain."""
    rows = []
    for domain, folder in sample_specs().items():
        for split in sorted(Path(folder).glob("*.parquet")):
            pairs = pd.read_parquet(split)
            for side in ("a", "b"):
                rows.append(pd.DataFrame({"id": pairs[f"paper_{side}"], "text": pairs[side], "domain": domain}))
    return pd.concat(rows).drop_duplicates("id").astype(str).sort_values("id").reset_index(drop=True)


def parse_dataset_specs(specs: list[str] | None) -> dict[str, str]:
    """`["CVD=GleghornLab/abstract_domain_cvd", "COPD=path/to/folder"]` -> {domain: source}; none -> the sample."""
    if not specs:
        return sample_specs()
    parsed = {}
    for spec in specs:
        domain, sep, source = spec.partition("=")
        if not sep or not domain.strip() or not source.strip():
            raise DatasetError(f"--dataset {spec!r}: write DOMAIN=SOURCE, e.g. CVD=GleghornLab/abstract_domain_cvd.")
        if domain in parsed:
            raise DatasetError(f"--dataset names domain {domain!r} twice.")
        parsed[domain.strip()] = source.strip()
    return parsed


def load_domain_dataset(source: str, splits=SPLITS, domain: str | None = None) -> DatasetDict:
    """Load and validate one domain's dataset; raises `DatasetError` naming what is missing."""
    label = f"dataset {source!r}" + (f" (domain {domain})" if domain else "")
    path = Path(source)
    if path.is_dir() and (path / "dataset_dict.json").exists():
        dataset = load_from_disk(str(path))
    elif path.is_dir():
        dataset = _load_split_files(path, label)
    elif path.exists():
        raise DatasetError(f"{label} is a file: give a folder holding one file per split (train.parquet, ...).")
    else:
        name, _, config = source.partition(":")  # "ORG/NAME:CONFIG" picks one config (domain) of a Hub dataset
        try:
            dataset = load_dataset(name, config or None)
        except Exception as error:  # the hub client raises many kinds; all mean "not loadable"
            raise DatasetError(
                f"{label} is not a local folder and could not be loaded from the Hub ({type(error).__name__}: "
                f"{error}). Check the id, your network, or pass a local folder."
            ) from None
    return validate_pairs(DatasetDict({s: dataset[s] for s in dataset}), splits, label)


def _load_split_files(folder: Path, label: str) -> DatasetDict:
    named = {f: split_name(f) for f in sorted(folder.iterdir()) if f.is_file()}
    files = {stem: (f, kind) for f, (stem, kind, _) in named.items() if stem in SPLITS and kind}
    if not files:
        raise DatasetError(
            f"{label}: no split files found in {folder}; expected train/valid/test with a suffix of {list(BUILDERS)} "
            "(the text formats may be compressed, e.g. train.csv.gz)."
        )
    builders = {BUILDERS[kind][0] for _, kind in files.values()}
    if len(builders) > 1:
        raise DatasetError(f"{label}: split files mix formats {sorted(builders)}; use one format.")
    # one split at a time, so that a split with other columns reaches validate_pairs and its clear message
    return DatasetDict({s: load_dataset(BUILDERS[kind][0], data_files={s: str(f)}, split=s, **BUILDERS[kind][1])
                        for s, (f, kind) in files.items()})


def validate_pairs(dataset: DatasetDict, splits, label: str) -> DatasetDict:
    missing_splits = [s for s in splits if s not in dataset]
    if missing_splits:
        raise DatasetError(f"{label} lacks splits {missing_splits}; it has {list(dataset)}.")
    for split in splits:
        columns = dataset[split].column_names
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DatasetError(f"{label}, split {split!r}, lacks columns {missing}; it has {columns}.")
        _check_rows(dataset[split], f"{label}, split {split!r}")
    return DatasetDict({s: dataset[s] for s in splits})


def _check_rows(split, where: str):
    labels = split["label"]
    bad_labels = sorted({v for v in labels if v not in (0, 1)}, key=str)
    if bad_labels:
        raise DatasetError(f"{where}: label must be 0 or 1, found {bad_labels[:5]}.")
    for column in ("a", "b"):
        empty = [i for i, text in enumerate(split[column]) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise DatasetError(f"{where}: {len(empty)} rows have an empty or missing '{column}' text (rows {empty[:5]}).")


def load_domain_datasets(specs: dict[str, str], splits=SPLITS) -> dict[str, DatasetDict]:
    return {domain: load_domain_dataset(source, splits, domain) for domain, source in specs.items()}


# ------------------------------------------------------------------------------------------------ text samples


def training_texts(source: str, domain: str | None = None) -> list[str]:
    """Both sides of a dataset's training pairs."""
    train = load_domain_dataset(source, splits=("train",), domain=domain)["train"]
    return [*train["a"], *train["b"]]


def text_sample(domain: str, source: str | None, count: int) -> tuple[list[str], str]:
    """`count` distinct training texts of a domain and where they come from: drawn from its dataset (`source`),
    topped up from the embedded sample when it has fewer (a domain of 35 texts samples activation ranges poorly:
    chosen on valid for OpenVINO's int8 calibration, docs/results.md), else the embedded sample alone."""
    own = []
    if source:
        try:
            own = _draw(training_texts(source, domain), count)
        except DatasetError as error:
            logger.warning(f"calibrating {domain} on {SAMPLE_NAME}: its training data cannot be loaded here "
                           f"({str(error).splitlines()[0][:160]})")
    if len(own) == count:
        return own, source
    taken = set(own)
    fill = [text for text in sample_texts(count) if text not in taken][: count - len(own)]
    return own + fill, f"{source} + {len(fill)} texts of {SAMPLE_NAME}" if own else SAMPLE_NAME


@functools.cache
def sample_texts(count: int) -> tuple[str, ...]:
    """`count` of the embedded sample's training texts, read and drawn once for every domain that needs them (at most
    `count` of them can be one domain's own, so what remains always fills the gap)."""
    return tuple(_draw([text for source in sample_specs().values() for text in training_texts(source)], count))


def _draw(texts: list[str], count: int) -> list[str]:
    unique = sorted({text for text in texts if text and text.strip()})
    return random.Random(0).sample(unique, min(count, len(unique)))
