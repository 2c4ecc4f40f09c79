"""What a search page serves over one index (app.py): a text query, papers like given ones, and two abstracts
compared. Every input is checked before any work, so a bad one gets one line that says what is wrong and what to do
(`QueryError`, or the index's own `SearchError`), and the service goes on serving; results are plain rows (rank, id,
title, snippet, domain, score, P(co-cited)) for a table or a JSON client."""

import re
from pathlib import Path

import numpy as np

from moebert.device import autocast
from moebert.encoders.interface import embed
from moebert.search.index import PaperIndex, chunk_file, chunk_numbers

MAX_QUERY_CHARS = 20_000  # a title and a long abstract are under 5,000; the model reads its first few hundred tokens
PREDICT = "predict"  # the domain choice that lets the index's classifier decide
SNIPPET_CHARS = 240


class QueryError(ValueError):
    """An input the service cannot answer; the message names the problem and the fix."""


def checked_text(text, what: str = "query") -> str:
    """The text stripped, or a QueryError: empty, too long, or not text (control characters of binary data)."""
    if not isinstance(text, str):
        raise QueryError(f"the {what} must be text, not {type(text).__name__}.")
    if not text.strip():
        raise QueryError(f"the {what} is empty: type or paste some words of a title or an abstract.")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the {what} is {len(text):,} characters: paste at most {MAX_QUERY_CHARS:,} (a title and "
                         "abstract; the model reads only the first few hundred words).")
    control = sum(1 for c in text if ord(c) < 32 and c not in "\t\n\r") + text.count("\ufffd")
    if control > max(2, len(text) // 100):
        raise QueryError(f"the {what} holds binary data ({control} control or undecodable characters), not text: "
                         "paste a title or an abstract.")
    return text.strip()


def parse_ids(text: str) -> list[str]:
    """Paper ids separated by commas, semicolons or white space; none is a QueryError."""
    ids = [i for i in re.split(r"[\s,;]+", checked_text(text, "list of paper ids")) if i]
    if not ids:
        raise QueryError("give at least one paper id (ids of the index's papers, separated by commas or spaces).")
    return ids


def title_and_snippet(text: str) -> tuple[str, str]:
    """A paper text is its title then its abstract: the first sentence, and the start of the rest."""
    title, _, rest = text.partition(". ")
    rest = rest.strip()
    snippet = rest[:SNIPPET_CHARS].rsplit(" ", 1)[0] + " ..." if len(rest) > SNIPPET_CHARS else rest
    return title.strip().rstrip("."), snippet


class PaperTexts:
    """The texts of an index's papers by row, read from the chunk tables only for the rows asked (a million-paper
    index does not hold its texts in memory), the latest chunks read kept."""

    def __init__(self, folder: Path):
        import pyarrow.parquet as pq

        self.files = [chunk_file(folder, n, ".parquet") for n in chunk_numbers(folder)]
        self.starts = np.cumsum([0] + [pq.ParquetFile(f).metadata.num_rows for f in self.files])
        self._cache: dict[int, list[str]] = {}

    def __getitem__(self, row: int) -> str:
        import pyarrow.parquet as pq

        chunk = int(np.searchsorted(self.starts, row, side="right") - 1)
        if chunk not in self._cache:
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            self._cache[chunk] = pq.read_table(self.files[chunk], columns=["text"]).column("text").to_pylist()
        return self._cache[chunk][row - self.starts[chunk]]


class SearchService:
    """Text search, papers like these, and two abstracts compared, over a loaded PaperIndex."""

    def __init__(self, index: PaperIndex):
        self.index = index
        self.texts = PaperTexts(index.folder)
        self.domains = list(index.manifest["domains"])
        self.calibrated = bool((index.encoder.config.calibration or {}).get("parameters"))

    @property
    def papers(self) -> int:
        return len(self.index.papers)

    def search(self, text: str, domain: str | None = PREDICT, top_k: int = 10) -> dict:
        """{"domain", "domain_probability" (None when chosen), "hits": rows} for a text query."""
        query = checked_text(text)
        [result] = self.index.search([query], self._domain(domain), self._top_k(top_k))
        return result | {"hits": [self._row(rank, hit) for rank, hit in enumerate(result["hits"], 1)]}

    def like(self, ids: str | list, top_k: int = 10) -> dict:
        """{"ids", "hits": rows (with `closest`)} of papers likely co-cited with the given ones."""
        ids = parse_ids(ids) if isinstance(ids, str) else ids
        result = self.index.similar_to(ids, self._top_k(top_k))
        return result | {"hits": [self._row(rank, hit) for rank, hit in enumerate(result["hits"], 1)]}

    def compare(self, abstract_a: str, abstract_b: str, domain: str | None = PREDICT) -> dict:
        """The cosine of two abstracts through one domain's expert (chosen, or predicted from both texts together)
        and the model's calibrated probability that they are co-cited (None for an uncalibrated model)."""
        a, b = checked_text(abstract_a, "first abstract"), checked_text(abstract_b, "second abstract")
        chosen = self._domain(domain)
        probability_of_domain = None
        if chosen is None:
            [chosen], [probability_of_domain] = self.index.classifier.predict([f"{a} {b}"])
        with autocast(self.index.encoder.device, self.index.precision):
            vectors = embed(self.index.encoder, [a, b], [chosen, chosen])
        cosine = float(vectors[0] @ vectors[1])
        return {"domain": chosen, "domain_probability": probability_of_domain and float(probability_of_domain),
                "cosine": cosine, "probability": self.index.cocitation_probability(cosine, chosen, chosen)}

    def _domain(self, domain: str | None) -> str | None:
        if domain in (None, "", PREDICT):
            return None
        if domain not in self.domains:
            raise QueryError(f"unknown domain {domain!r}: choose one of {self.domains}, or {PREDICT!r}.")
        return domain

    @staticmethod
    def _top_k(top_k) -> int:
        try:
            top_k = int(top_k)
        except (TypeError, ValueError):
            raise QueryError(f"the number of results must be a whole number, not {top_k!r}.") from None
        if not 1 <= top_k <= 100:
            raise QueryError(f"the number of results must be between 1 and 100, not {top_k}.")
        return top_k

    def _row(self, rank: int, hit: dict) -> dict:
        title, snippet = title_and_snippet(self.texts[self.index.row_of_id[str(hit["id"])]])
        return {"rank": rank, "id": str(hit["id"]), "title": title, "snippet": snippet, "domain": hit["domain"],
                "score": round(hit["score"], 4),
                "probability": None if hit["probability"] is None else round(hit["probability"], 3)} | (
                    {"closest": str(hit["closest"])} if "closest" in hit else {})

