"""Build co-citation pair datasets from a citation graph.

Two papers are *co-cited* when at least one paper cites both; the number of such papers is their
`cocitation_count`. Positives are co-cited pairs; negatives are pairs never co-cited and not citing each other.
A pair belongs to a domain when both papers do; pairs across domains are left out (the summary counts them).

Splits do not leak by default (`split_by="paper"`): every paper lies in exactly one split and a pair is kept
only within one, so no abstract of `test` is seen in training (papers with the same text are merged first).
`valid` and `test` are random papers of the domain, added one at a time until each holds its share of the kept
co-cited pairs (see `split_papers`). A domain that cannot give usable splits is left out with the reason in the
summary, and the others are built. `split_by="pair"` reproduces the paper's random pair split, in which test
abstracts also occur in training pairs; keep it for comparison with the published numbers only.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

SPLITS = ("train", "valid", "test")


@dataclass
class BuildOptions:
    split_by: str = "paper"  # "paper" (no leakage) or "pair" (the paper's random pair split)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # of co-cited pairs, per domain
    train_negatives: float = 0.0  # negatives per positive in train; valid and test are always 50/50
    min_cocitations: int = 1
    seed: int = 42

    def __post_init__(self):
        if self.split_by not in ("paper", "pair"):
            raise ValueError(f"split_by={self.split_by!r}: choose 'paper' (no leakage) or 'pair'.")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions {self.split_fractions} must be three numbers that sum to 1.")


@dataclass
class CitationGraph:
    """Papers with text and domain, indexed 0..n-1, and the citation links among all known ids."""

    paper_ids: np.ndarray  # str ids of papers with text
    texts: np.ndarray
    domains: np.ndarray
    citing: np.ndarray  # index into `all_ids` of the citing paper (which may have no text)
    cited: np.ndarray  # index into paper_ids of the cited paper
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- the graph


def _require_columns(table: pd.DataFrame, columns: tuple, what: str):
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"the {what} table lacks columns {missing}; it has {list(table.columns)}.")


def make_graph(papers: pd.DataFrame, citations: pd.DataFrame) -> CitationGraph:
    """Validate the two tables and index them. Papers: `id`, `text`, `domain`. Citations: `citing`, `cited`."""
    _require_columns(papers, ("id", "text", "domain"), "papers")
    _require_columns(citations, ("citing", "cited"), "citations")
    papers = papers.assign(id=papers["id"].astype(str), text=papers["text"].fillna("").astype(str).str.strip())
    empty = papers["text"] == ""
    duplicated = papers["id"].duplicated()
    if duplicated.any():
        raise ValueError(f"paper ids occur more than once: {papers['id'][duplicated].unique()[:5].tolist()}; keep one row "
                         "per paper.")
    papers = papers[~empty].reset_index(drop=True)
    # one paper per text: the same abstract under two ids would otherwise land in two splits (a leak)
    same_text = papers["text"].str.split().str.join(" ")
    first_id = papers.groupby(same_text, sort=False)["id"].transform("first")
    merged = first_id != papers["id"]
    merged_into = dict(zip(papers["id"][merged], first_id[merged]))
    papers = papers[~merged].reset_index(drop=True)
    index = pd.Series(np.arange(len(papers)), index=papers["id"])

    citing = citations["citing"].astype(str).replace(merged_into)
    cited = citations["cited"].astype(str).replace(merged_into)
    self_links = citing == cited
    known_cited = cited.isin(index.index)
    links = pd.DataFrame({"citing": citing, "cited": cited})[known_cited & ~self_links].drop_duplicates()
    all_ids = pd.Index(pd.concat([papers["id"], links["citing"]]).unique())
    stats = {
        "papers": int(len(papers)),
        "papers_without_text_dropped": int(empty.sum()),
        "duplicate_texts_merged": int(merged.sum()),
        "citation_links": int(len(citations)),
        "self_citations_dropped": int(self_links.sum()),
        "links_to_papers_without_text_dropped": int((~known_cited & ~self_links).sum()),
        "duplicate_links_dropped": int((known_cited & ~self_links).sum() - len(links)),
    }
    return CitationGraph(
        paper_ids=papers["id"].to_numpy(),
        texts=papers["text"].to_numpy(),
        domains=papers["domain"].astype(str).to_numpy(),
        citing=all_ids.get_indexer(links["citing"]),
        cited=index[links["cited"]].to_numpy(),
        stats=stats | {"citing_papers": int(links["citing"].nunique())},
    )


# --------------------------------------------------------------------------------------------- co-citation


def cocitation_matrix(graph: CitationGraph) -> sp.csr_matrix:
    """Upper triangle of C^T C: entry (i, j), i < j, counts the papers citing both i and j."""
    n_citing = int(graph.citing.max()) + 1 if len(graph.citing) else 0
    n = len(graph.paper_ids)
    cites = sp.csr_matrix(
        (np.ones(len(graph.citing), dtype=np.int32), (graph.citing, graph.cited)), shape=(n_citing, n)
    )
    return sp.triu(cites.T @ cites, k=1).tocsr()


def direct_link_keys(graph: CitationGraph) -> np.ndarray:
    """Keys of pairs (i < j) of papers with text where one cites the other."""
    n = len(graph.paper_ids)
    among_papers = graph.citing < n  # papers with text come first in the index of citing ids
    i, j = graph.citing[among_papers], graph.cited[among_papers]
    return _pair_keys(np.minimum(i, j), np.maximum(i, j), n)


def _pair_keys(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    return i.astype(np.int64) * n + j.astype(np.int64)


# --------------------------------------------------------------------------------------------- splitting


def split_papers(rows, cols, papers: np.ndarray, fractions, rng) -> np.ndarray:
    """Assign each paper of one domain to a split (0 train, 1 valid, 2 test).

    Everything starts in train. Random papers then move, one at a time, to the held-out split furthest below its
    share of the pairs kept so far, until `valid` and `test` each hold their fraction of the kept pairs. Random
    papers spread the held-out positives over the whole domain (a compact block of the co-citation graph would
    hold few citing contexts and look unlike the rest). Pairs that straddle two splits are dropped: the price of
    splits that share no abstract. Papers with no co-cited partner are spread in proportion to the papers of each
    split, as the pool of random negatives.
    """
    m = len(papers)
    local = np.full(int(papers.max()) + 1 if m else 0, -1, dtype=np.int64)
    local[papers] = np.arange(m)
    li, lj = local[rows], local[cols]
    adjacency = sp.csr_matrix((np.ones(len(li), dtype=np.int8), (li, lj)), shape=(m, m))
    adjacency = (adjacency + adjacency.T).tocsr()
    split = np.zeros(m, dtype=np.int64)
    kept = np.array([len(li), 0, 0], dtype=np.float64)  # pairs inside each split
    wanted = np.asarray(fractions, dtype=np.float64)
    connected = np.diff(adjacency.indptr) > 0
    for paper in rng.permutation(np.flatnonzero(connected)):
        shortfall = wanted[1:] * kept.sum() - kept[1:]
        if (shortfall <= 0).all():
            break
        target = 1 + int(np.argmax(shortfall / np.maximum(wanted[1:], 1e-12)))
        partners = split[adjacency.indices[adjacency.indptr[paper] : adjacency.indptr[paper + 1]]]
        kept[0] -= (partners == 0).sum()
        kept[target] += (partners == target).sum()
        split[paper] = target
    loose = np.flatnonzero(~connected)
    shares = np.bincount(split[connected], minlength=3) if connected.any() else wanted
    split[loose] = rng.choice(3, size=len(loose), p=shares / shares.sum())
    return split


def sample_negatives(papers: np.ndarray, count: int, forbidden: np.ndarray, drawn: np.ndarray, n: int, rng) -> np.ndarray:
    """`count` distinct random pairs (i < j) of the given papers whose key `i * n + j` is neither in the sorted
    array `forbidden` (co-cited or directly linked pairs) nor in `drawn` (negatives drawn before)."""
    if count == 0:
        return np.zeros((0, 2), dtype=np.int64)
    chosen = np.zeros(0, dtype=np.int64)
    for _ in range(50):
        draw = papers[rng.integers(0, len(papers), size=(2 * (count - len(chosen)) + 16, 2))]
        i, j = draw.min(axis=1), draw.max(axis=1)
        keys = _pair_keys(i, j, n)[i != j]
        keys = keys[~_contains(forbidden, keys) & ~np.isin(keys, drawn) & ~np.isin(keys, chosen)]
        _, first = np.unique(keys, return_index=True)
        chosen = np.concatenate([chosen, keys[np.sort(first)]])[:count]
        if len(chosen) == count:
            return np.stack([chosen // n, chosen % n], axis=1)
    raise ValueError(
        f"could not find {count} negative pairs among {len(papers)} papers: too few pairs are never co-cited."
    )


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    where = np.searchsorted(sorted_keys, keys)
    return (where < len(sorted_keys)) & (sorted_keys[np.minimum(where, len(sorted_keys) - 1)] == keys)


# --------------------------------------------------------------------------------------------- building


def build_pairs(graph: CitationGraph, options: BuildOptions = BuildOptions()) -> tuple[dict, dict]:
    """Per-domain pair tables {domain: {split: pyarrow.Table}} and a summary."""
    rng = np.random.default_rng(options.seed)
    n = len(graph.paper_ids)
    counts = cocitation_matrix(graph).tocoo()
    keep = counts.data >= options.min_cocitations
    rows, cols, values = counts.row[keep], counts.col[keep], counts.data[keep]
    forbidden = np.union1d(_pair_keys(counts.row, counts.col, n), direct_link_keys(graph))
    same_domain = graph.domains[rows] == graph.domains[cols]
    summary = {
        "graph": graph.stats,
        "options": dict(vars(options)),
        "cocited_pairs": int(len(rows)),
        "cross_domain_pairs_left_out": int((~same_domain).sum()),
        "domains": {},
        "domains_left_out": {},
    }
    tables, drawn = {}, np.zeros(0, dtype=np.int64)
    for domain in sorted(set(graph.domains.tolist())):
        in_domain = same_domain & (graph.domains[rows] == domain)
        papers = np.flatnonzero(graph.domains == domain)
        try:
            tables[domain], summary["domains"][domain], drawn = _build_domain(
                graph, domain, papers, rows[in_domain], cols[in_domain], values[in_domain], forbidden, drawn, options, rng
            )
        except DomainLeftOut as reason:
            summary["domains_left_out"][domain] = str(reason)
    kept = sum(s[split]["positives"] for s in summary["domains"].values() for split in SPLITS)
    in_domains = int(same_domain.sum())
    summary["kept_share"] = kept / in_domains if in_domains else 0.0  # of the within-domain co-cited pairs
    return tables, summary


class DomainLeftOut(Exception):
    """A domain that cannot give usable splits; the message says why. The other domains are built."""


def _build_domain(graph, domain, papers, rows, cols, values, forbidden, drawn, options, rng):
    n = len(graph.paper_ids)
    if len(rows) == 0:
        raise DomainLeftOut(f"no co-cited pair among its {len(papers)} papers")
    if options.split_by == "paper":
        paper_split = np.full(n, -1)
        paper_split[papers] = split_papers(rows, cols, papers, options.split_fractions, rng)
        pair_split = np.where(paper_split[rows] == paper_split[cols], paper_split[rows], -1)
        split_papers_of = {s: papers[paper_split[papers] == s] for s in range(3)}
    else:
        pair_split = rng.choice(3, size=len(rows), p=list(options.split_fractions))
        split_papers_of = {s: papers for s in range(3)}
    tables, stats = {}, {"papers": int(len(papers)), "straddling_pairs_dropped": int((pair_split < 0).sum())}
    for s, split in enumerate(SPLITS):
        mine = pair_split == s
        positives = np.stack([rows[mine], cols[mine]], axis=1)
        ratio = options.train_negatives if split == "train" else 1.0
        if split != "train" and len(positives) == 0 and options.split_fractions[s] > 0:
            raise DomainLeftOut(f"its {len(rows)} co-cited pairs leave no positive pair for {split}")
        try:
            negatives = sample_negatives(split_papers_of[s], int(round(ratio * len(positives))), forbidden, drawn, n, rng)
        except ValueError as error:
            raise DomainLeftOut(f"{split}: {error}") from None
        drawn = np.concatenate([drawn, _pair_keys(negatives[:, 0], negatives[:, 1], n)])  # no pair twice
        pairs = np.concatenate([positives, negatives])
        labels = np.concatenate([np.ones(len(positives), dtype=np.int64), np.zeros(len(negatives), dtype=np.int64)])
        cocitations = np.concatenate([values[mine], np.zeros(len(negatives), dtype=values.dtype)])
        shuffle = rng.permutation(len(pairs))
        tables[split] = _pair_table(graph, domain, pairs[shuffle], labels[shuffle], cocitations[shuffle])
        stats[split] = {
            "pairs": int(len(pairs)),
            "positives": int(len(positives)),
            "negatives": int(len(negatives)),
            "papers": int(len(np.unique(pairs))) if len(pairs) else 0,
        }
    return tables, stats, drawn


def _pair_table(graph, domain, pairs, labels, cocitations) -> pa.Table:
    a, b = pairs[:, 0], pairs[:, 1]
    return pa.table(
        {
            "a": pa.array(graph.texts[a].tolist(), pa.string()),
            "b": pa.array(graph.texts[b].tolist(), pa.string()),
            "label": pa.array(labels, pa.int64()),
            "domain": pa.array([domain] * len(pairs), pa.string()),
            "paper_a": pa.array(graph.paper_ids[a].tolist(), pa.string()),
            "paper_b": pa.array(graph.paper_ids[b].tolist(), pa.string()),
            "cocitation_count": pa.array(cocitations, pa.int64()),
        }
    )


# --------------------------------------------------------------------------------------------- writing


def write_pairs(tables: dict, summary: dict, output_dir: str | Path) -> None:
    """`<output_dir>/<domain>/<split>.parquet` and `summary.json`; the same input gives the same bytes."""
    output_dir = Path(output_dir)
    for domain, splits in tables.items():
        (output_dir / domain).mkdir(parents=True, exist_ok=True)
        for split, table in splits.items():
            pq.write_table(table, output_dir / domain / f"{split}.parquet", compression="zstd")
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_summary(summary: dict) -> str:
    """A markdown table of pairs per domain and split."""
    lines = [
        "| domain | papers | " + " | ".join(f"{s} pairs (pos/neg)" for s in SPLITS) + " | pairs dropped across splits |",
        "|---|---|" + "---|" * len(SPLITS) + "---|",
    ]
    for domain, stats in summary["domains"].items():
        cells = [f"{stats[s]['pairs']} ({stats[s]['positives']}/{stats[s]['negatives']})" for s in SPLITS]
        lines.append(f"| {domain} | {stats['papers']} | " + " | ".join(cells) + f" | {stats['straddling_pairs_dropped']} |")
    lines.append(
        f"\n{summary['cocited_pairs']} co-cited pairs in the graph; {summary['cross_domain_pairs_left_out']} cross-domain "
        f"pairs left out; {summary['kept_share']:.1%} of the within-domain pairs kept in a split."
    )
    lines += [f"Domain {d} left out: {why}." for d, why in summary["domains_left_out"].items()]
    return "\n".join(lines)
