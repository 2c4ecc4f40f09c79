"""Time and peak memory of building co-citation pairs from a generated citation graph.

    python -m benchmarks.bench_data [--papers 100000] [--links 1000000] [--domains 5]

The graph mixes ordinary papers (about 10 references) with reviews (2% of citing papers, about 100 references,
which produce most co-cited pairs), all papers cited with a long-tailed popularity. Texts are short generated
strings, so the figures measure the graph work rather than copying long abstracts.
"""

import argparse
import resource
import tempfile
import time

import numpy as np
import pandas as pd

from moebert.data.cocitation import BuildOptions, build_pairs, make_graph, write_pairs


def generated_graph(n_papers: int, n_links: int, n_domains: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    papers = pd.DataFrame(
        {
            "id": np.arange(n_papers).astype(str),
            "text": [f"generated abstract number {i}" for i in range(n_papers)],
            "domain": np.array([f"D{d}" for d in range(n_domains)])[rng.integers(0, n_domains, n_papers)],
        }
    )
    # citing papers: 2% reviews with ~100 references, the rest ~10; trimmed to exactly n_links links
    is_review = rng.random(n_papers) < 0.02
    references = np.where(is_review, rng.poisson(100, n_papers), rng.poisson(10, n_papers))
    citing = np.repeat(np.arange(n_papers), references)[:n_links]
    popularity = rng.pareto(1.5, n_papers) + 1
    cited = rng.choice(n_papers, size=len(citing), p=popularity / popularity.sum())
    # a domain's reviews mostly cite that domain: redraw 70% of the references inside the citing paper's domain
    same_domain = rng.random(len(citing)) < 0.7
    domain_of = papers["domain"].to_numpy()
    by_domain = {d: np.flatnonzero(domain_of == d) for d in np.unique(domain_of)}
    for domain, members in by_domain.items():
        mask = same_domain & (domain_of[citing] == domain)
        cited[mask] = rng.choice(members, size=mask.sum())
    return papers, pd.DataFrame({"citing": citing.astype(str), "cited": cited.astype(str)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--papers", type=int, default=100_000)
    parser.add_argument("--links", type=int, default=1_000_000)
    parser.add_argument("--domains", type=int, default=5)
    args = parser.parse_args()

    papers, citations = generated_graph(args.papers, args.links, args.domains)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    tables, summary = build_pairs(make_graph(papers, citations), BuildOptions())
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        write_pairs(tables, summary, folder)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pairs = sum(stats[s]["pairs"] for stats in summary["domains"].values() for s in ("train", "valid", "test"))
    print(f"graph: {args.papers:,} papers, {len(citations):,} citation links, {args.domains} domains")
    print(f"co-cited pairs: {summary['cocited_pairs']:,}; pairs written: {pairs:,}")
    print(f"build {built:.1f} s, build + write parquet {total:.1f} s")
    print(f"peak resident memory {peak:,.0f} MiB (generated input alone: {rss_before:,.0f} MiB)")


if __name__ == "__main__":
    main()
