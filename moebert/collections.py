"""Paper collections to index: a table with columns `id`, `text`, `domain`, read in pieces so that no process holds
a whole literature in memory.

A collection is a parquet file (read by row groups), a csv/tsv/jsonl file (streamed; also compressed: .gz, .bz2,
.xz, .zst), a `save_to_disk` folder (memory-mapped), a Hub dataset id (streamed), or by default every paper of the
embedded SYNERGY sample. Pieces come in the collection's own order, so piece k is the same rows in every run.
"""

from pathlib import Path

import pandas as pd

from moebert.pair_datasets import SAMPLE_DIR

COLUMNS = ("id", "text", "domain")


class CollectionError(ValueError):
    """A collection that cannot be read as given; the message names the problem and the fix."""


def shipped_papers() -> pd.DataFrame:
    """Every paper of the embedded SYNERGY sample (all splits), once."""
    rows = []
    for folder in sorted(p for p in SAMPLE_DIR.iterdir() if p.is_dir()):
        for split in sorted(folder.glob("*.parquet")):
            pairs = pd.read_parquet(split)
            for side in ("a", "b"):
                rows.append(pd.DataFrame({"id": pairs[f"paper_{side}"], "text": pairs[side], "domain": folder.name}))
    return pd.concat(rows).drop_duplicates("id").astype(str).sort_values("id").reset_index(drop=True)


def iter_pieces(source: str | None, size: int):
    """The collection in pieces of `size` rows, in its own order: DataFrames with columns id, text, domain as
    strings. Rows without text stay (the caller drops them), so piece k always starts at row k * size."""
    for piece in _raw_pieces(source, size):
        missing = [c for c in COLUMNS if c not in piece.columns]
        if missing:
            raise CollectionError(f"--papers {source}: the table lacks columns {missing} (it has "
                                  f"{list(piece.columns)}); a collection needs id, text and domain.")
        yield piece[list(COLUMNS)].fillna("").astype(str).reset_index(drop=True)


def _raw_pieces(source: str | None, size: int):
    if source is None:
        papers = shipped_papers()
        yield from (papers.iloc[start : start + size] for start in range(0, len(papers), size))
        return
    path = Path(source)
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        yield from (dataset.select(range(start, min(start + size, len(dataset)))).to_pandas()
                    for start in range(0, len(dataset), size))
    elif path.is_file() and suffixes[-1:] == [".parquet"]:
        import pyarrow.parquet as pq

        yield from (batch.to_pandas() for batch in pq.ParquetFile(path).iter_batches(batch_size=size))
    elif path.is_file() and suffixes[-1:] in ([".csv"], [".tsv"]):
        separator = "\t" if suffixes[-1] == ".tsv" else ","
        yield from pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, chunksize=size)
    elif path.is_file() and suffixes[-1:] == [".jsonl"]:
        yield from pd.read_json(path, lines=True, dtype=False, chunksize=size)
    elif path.exists():
        raise CollectionError(f"--papers {source}: unsupported format; give .parquet, .csv, .tsv or .jsonl (the text "
                              "formats also compressed), a save_to_disk folder, or a Hub dataset id.")
    else:
        yield from _hub_pieces(source, size)


def _hub_pieces(source: str, size: int):
    from datasets import load_dataset

    try:
        stream = load_dataset(source, split="train", streaming=True)
        batches = iter(stream.iter(batch_size=size))
        first = next(batches, None)
    except Exception as error:  # the hub client raises many kinds; all mean "not loadable"
        raise CollectionError(f"--papers {source!r} is no local file or folder and no loadable Hub dataset "
                              f"({type(error).__name__}: {error}).") from None
    for batch in ([first] if first is not None else []):
        yield pd.DataFrame(batch)
    yield from (pd.DataFrame(batch) for batch in batches)
