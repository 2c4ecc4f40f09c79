"""Tables on disk: csv, tsv, jsonl, json and parquet, the text formats also gzip-, bz2-, xz- or zstd-compressed
(`papers.csv.gz`). The one place that decides what a file's name says about its format (`table_format`), read whole
(`read_table`: citation graphs, query files) or in pieces of a given number of rows (`read_table_pieces`: collections
to index). Pair datasets' split files are recognised here too and read by `datasets` (moebert.data.pairs).
"""

import contextlib
from pathlib import Path

import pandas as pd

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class TableError(ValueError):
    """A table that cannot be read as given; the message names the problem and the fix."""


def split_name(path) -> tuple[str, str | None, str | None]:
    """(stem, format, compression) of a file name: `train.csv.gz` -> ("train", ".csv", ".gz"); the format is None
    when the name names none of FORMATS (or a compressed parquet file: parquet compresses inside)."""
    name = Path(path).name
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    name = name.removesuffix(compression or "")
    kind = next((f for f in FORMATS if name.endswith(f)), None)
    kind = None if kind == ".parquet" and compression else kind
    return name.removesuffix(kind or ""), kind, compression


def table_format(path) -> str:
    """The format of a table file (one of FORMATS), or a TableError that lists what can be read."""
    _, kind, _ = split_name(Path(path))
    if kind is None:
        raise TableError(
            f"{path}: unsupported table format {''.join(Path(path).suffixes[-2:])!r}; use .csv, .tsv, .jsonl or "
            ".parquet (the text formats may be compressed, e.g. .csv.gz)."
        )
    return kind


def read_table(path) -> pd.DataFrame:
    """A whole table; its cells as the file gives them (csv and tsv as strings)."""
    kind = table_format(path)
    with readable(path):
        if kind == ".parquet":
            return pd.read_parquet(path)
        if kind in (".jsonl", ".json"):
            return pd.read_json(path, lines=kind == ".jsonl", dtype=False)  # compression from the file name
        return pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", dtype=str)


def read_table_pieces(path, size: int):
    """The table in pieces of `size` rows, in its own order (parquet by batches, the text formats streamed), so that
    no process holds a whole literature in memory; csv and tsv cells as strings, empty ones as ''."""
    kind = table_format(path)
    with readable(path):
        if kind == ".parquet":
            import pyarrow.parquet as pq

            yield from (batch.to_pandas() for batch in pq.ParquetFile(path).iter_batches(batch_size=size))
        elif kind == ".jsonl":
            yield from pd.read_json(path, lines=True, dtype=False, chunksize=size)
        elif kind == ".json":  # one JSON array: read whole, handed out in pieces
            table = read_table(path)
            yield from (table.iloc[start : start + size] for start in range(0, len(table), size))
        else:
            yield from pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", dtype=str, keep_default_na=False,
                                   chunksize=size)


@contextlib.contextmanager
def readable(path):
    """What pandas raises for a file that is not clean UTF-8 or not well formed, as a TableError that says where and
    how to fix it (also for the pieces of a streamed table, which fail as they are read)."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise TableError(
            f"{path}: not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} at offset {error.start}); "
            "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8."
        ) from None
    except (pd.errors.ParserError, ValueError) as error:
        if isinstance(error, TableError):
            raise
        raise TableError(f"{path}: malformed table ({str(error).strip().splitlines()[-1]}); fix or remove that row.") from None
