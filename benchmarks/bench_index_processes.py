"""`search.py index` end to end on real abstracts, with one process and with several (`accelerate launch`): the
throughput of each, and whether they build the same index.

    python -m benchmarks.bench_index_processes [--processes 1,2] [--backend onnx] [--chunk_size 256]

The collection: every SYNERGY abstract and every CiteSeer abstract of ../shared (about 10,400 papers, 16 domains);
the model: the embedded base upcycled into those 16 domains (each paper through its domain's expert; untrained, so
throughput is what is measured, not quality). The model is exported to ONNX once before the clock (with `--backend
onnx`), then each run indexes into a fresh folder; several CPU processes share the cores (accelerate gives each
one thread). Prints wall time, papers per second and peak memory per run, and the largest difference between the
runs' vectors.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from moebert.data.builds import SHARED_CITESEER, SHARED_SYNERGY, read_citeseer

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, backend: str) -> tuple[Path, Path]:
    """The collection (csv) and the model (a folder), and its ONNX export in the cache, made once."""
    from modeling_moebert import MoEBertModel
    from moebert.names import default_base_model

    papers = pd.concat([pd.read_csv(SHARED_SYNERGY / "papers.csv.gz")[["id", "text", "domain"]],
                        read_citeseer(SHARED_CITESEER)[0].assign(id=lambda t: "citeseer-" + t["id"])])
    papers = papers.dropna().astype(str)
    papers.to_csv(work / "papers.csv", index=False)
    model, tokenizer = MoEBertModel.from_bert(default_base_model(), domains=sorted(papers["domain"].unique()),
                                              moe_layers="top2")
    model.config.max_seq_length = 256
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    if backend == "onnx":
        from moebert.encoders.loader import load_encoder
        from moebert.encoders.options import EncodingOptions

        load_encoder(str(work / "model"), EncodingOptions(backend="onnx", device="cpu"))  # exports once
    return work / "papers.csv", work / "model"


def run(processes: int, papers: Path, model: Path, out: Path, backend: str, chunk_size: int) -> dict:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)] \
        if processes > 1 else [sys.executable]
    command = [*launch, str(ROOT / "search.py"), "index", "--papers", str(papers), "--model", str(model),
               "--output_dir", str(out), "--backend", backend, "--chunk_size", str(chunk_size), "--device", "cpu"]
    started = time.perf_counter()
    done = subprocess.run(command, env=os.environ | {"ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB: the largest child so far
    return {"seconds": seconds, "peak": peak}


def vectors(out: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((out / "chunks").glob("[0-9]*.npy"))])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--backend", default="onnx", choices=["torch", "onnx"])
    parser.add_argument("--chunk_size", type=int, default=256)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-index-processes-"))
    os.environ["MOEBERT_CACHE"] = str(work / "cache")
    started = time.perf_counter()
    papers, model = prepare(work, args.backend)
    count = len(pd.read_csv(papers))
    print(f"{count} papers; model and its export ready in {time.perf_counter() - started:.0f} s", flush=True)
    results = {}
    for processes in (int(p) for p in args.processes.split(",")):
        results[processes] = run(processes, papers, model, work / f"index-{processes}", args.backend, args.chunk_size)
        print(f"{processes} process(es): {results[processes]['seconds']:.0f} s", flush=True)
    first = vectors(work / f"index-{min(results)}")
    print(f"\n| processes | wall | papers/s | vs one process | largest vector difference to {min(results)} process |")
    print("|---|---|---|---|---|")
    for processes, result in results.items():
        difference = np.abs(vectors(work / f"index-{processes}") - first).max()
        print(f"| {processes} | {result['seconds']:.0f} s | {count / result['seconds']:.1f} | "
              f"{results[min(results)]['seconds'] / result['seconds']:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
