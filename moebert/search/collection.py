"""Paper collections to index: a table with columns `id`, `text`, `domain`, read in pieces so that no process holds
a whole literature in memory.

A collection is a table file (moebert.data.tables: parquet read by row groups, csv/tsv/jsonl streamed, also
compressed), a `save_to_disk` folder (memory-mapped), a Hub dataset id (streamed), or by default every paper of the
embedded SYNERGY sample. Pieces come in the collection's own order, so piece k is the same rows in every run.
"""

from pathlib import Path

import pandas as pd

from moebert.data.pairs import sample_papers
from moebert.data.tables import TableError, read_table_pieces

COLUMNS = ("id", "text", "domain")


class CollectionError(ValueError):
    """A collection that cannot be read as given; the message names the problem and the fix."""


def iter_pieces(source: str | None, size: int):
    """The collection in pieces of `size` rows, in its own order: DataFrames with columns id, text, domain as
    strings. Rows without text stay (the caller drops them), so piece k always starts at row k * size."""
    try:
        for piece in _raw_pieces(source, size):
            missing = [c for c in COLUMNS if c not in piece.columns]
            if missing:
                raise CollectionError(f"--papers {source}: the table lacks columns {missing} (it has "
                                      f"{list(piece.columns)}); a collection needs id, text and domain.")
            yield piece[list(COLUMNS)].fillna("").astype(str).reset_index(drop=True)
    except TableError as error:
        raise CollectionError(f"--papers {error}") from None


def _raw_pieces(source: str | None, size: int):
    if source is None:
        papers = sample_papers()
        yield from (papers.iloc[start : start + size] for start in range(0, len(papers), size))
        return
    path = Path(source)
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        yield from (dataset.select(range(start, min(start + size, len(dataset)))).to_pandas()
                    for start in range(0, len(dataset), size))
    elif path.exists():
        yield from read_table_pieces(path, size)
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
