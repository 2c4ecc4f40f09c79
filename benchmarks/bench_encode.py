"""Texts per second of every way to embed a collection on this CPU, side by side in one run.

    python -m benchmarks.bench_encode [--texts 2000] [--max_seq_length 256] [--batch_size 32] [--model PATH]
                                      [--st_onnx_python .venv-st-onnx/bin/python]
                                      [--st_openvino_python .venv-st-ov/bin/python]

Every row embeds the same SYNERGY abstracts (the first N shipped papers by id) at the same length, in a fresh
process of its own (so each reports its own peak memory), after a warm-up on 64 texts:

- sentence-transformers `encode` of the base (all-MiniLM-L6-v2), fp32: the reference;
- sentence-transformers' own ONNX backend on the base, int8 weights (`export_dynamic_quantized_onnx_model`,
  the config for this CPU), and its OpenVINO backend, fp32 and int8 (`export_static_quantized_openvino_model`,
  NNCF's static quantization, calibrated on 300 SYNERGY abstracts that are not benchmarked, since its default
  calibration set is on the Hub): the alternatives a user would pick. They need `optimum-onnx` and
  `optimum-intel`, which require older transformers, so they run in environments of their own
  (benchmarks/requirements-st-onnx.txt, -st-openvino.txt) given by `--st_onnx_python` and `--st_openvino_python`;
  without them their rows are skipped;
- ours (`moebert.encoders.interface.embed`: each text through its domain's expert; `--model`, default the embedded base
  upcycled into the SYNERGY domains) on torch fp32, torch under bf16 autocast (where bf16 is native), ONNX Runtime
  fp32 and int8, and OpenVINO fp32 and int8 (moebert.encoders.export.cache; exported in a process of its own before, the export
  time printed apart).

- the whole `search.py index` command on the same papers (a parquet file of them), from its start to its end:
  with its defaults on a cache of its own, the first time (the export included) and again (the export cached), and
  with `--backend onnx` and `--backend torch`; its stage times (the lines it logs) are printed under the table, so a
  path slower than its encoder shows where.

Prints texts/s, the ratio to the reference, the lowest cosine of each vector to its fp32 twin (ours: torch fp32;
sentence-transformers' ONNX: its own fp32) and the process's peak memory. The rows that use no bf16 are what a CPU
without native bf16 gets.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "st-fp32": "sentence-transformers encode, fp32",
    "st-onnx-int8": "sentence-transformers ONNX, int8",
    "torch-fp32": "ours, torch fp32",
    "torch-bf16": "ours, torch bf16 autocast",
    "onnx-fp32": "ours, ONNX Runtime fp32",
    "onnx-int8": "ours, ONNX Runtime int8",
    "st-openvino-fp32": "sentence-transformers OpenVINO, fp32",
    "st-openvino-int8": "sentence-transformers OpenVINO, int8",
    "openvino-fp32": "ours, OpenVINO fp32",
    "openvino-int8": "ours, OpenVINO int8",
    "index-first": "search.py index, first run (exports)",
    "index": "search.py index (export cached)",
    "index-onnx": "search.py index --backend onnx",
    "index-torch": "search.py index --backend torch",
}
TWIN = {"st-onnx-int8": "st-fp32", "st-openvino-fp32": "st-fp32", "st-openvino-int8": "st-fp32",
        "torch-bf16": "torch-fp32", "onnx-fp32": "torch-fp32", "onnx-int8": "torch-fp32",
        "openvino-fp32": "torch-fp32", "openvino-int8": "torch-fp32", "index-first": "torch-fp32", "index": "torch-fp32",
        "index-onnx": "torch-fp32", "index-torch": "torch-fp32"}
COMMAND_FLAGS = {"index-first": [], "index": [], "index-onnx": ["--backend", "onnx"],
                 "index-torch": ["--backend", "torch"]}  # rows that time the whole command a user runs
EXPORTED = ("onnx", "openvino")  # our rows that export the model first
OWN_PYTHON = {"st-onnx-int8": "st_onnx_python", "st-openvino-fp32": "st_openvino_python",
              "st-openvino-int8": "st_openvino_python"}  # rows that run in an environment of their own


# ------------------------------------------------------------------------------------------------ one row, in a child


def sentence_transformer(args, row: str):
    from sentence_transformers import SentenceTransformer

    if row == "st-fp32":
        return SentenceTransformer(args.base, device="cpu")
    if row == "st-onnx-int8":
        return st_onnx_int8(args)
    if row == "st-openvino-fp32":
        return SentenceTransformer(args.base, backend="openvino", device="cpu")
    return st_openvino_int8(args)


def st_copy(args, name: str) -> Path:
    """A copy of the base to export beside: the base's own folder stays untouched."""
    import shutil

    copy = Path(args.work) / name
    if not copy.exists():
        shutil.copytree(args.base, copy)
    return copy


def st_onnx_int8(args):
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    copy = st_copy(args, "st-onnx-base")
    if not list((copy / "onnx").glob("model_qint8_*.onnx")):
        SentenceTransformer(str(copy), backend="onnx", device="cpu").save_pretrained(str(copy))  # writes onnx/model.onnx
        model = SentenceTransformer(str(copy), backend="onnx", device="cpu")
        export_dynamic_quantized_onnx_model(model, "avx512_vnni" if avx512_vnni() else "avx2", str(copy))
    quantized = next(p.name for p in (copy / "onnx").glob("model_qint8_*.onnx"))
    return SentenceTransformer(str(copy), backend="onnx", device="cpu", model_kwargs={"file_name": f"onnx/{quantized}"})


def st_openvino_int8(args):
    """As sentence-transformers' docs quantize: `export_static_quantized_openvino_model` with its default
    configuration, the calibration texts given as a local dataset (jsonl with a `sentence` field)."""
    from sentence_transformers import SentenceTransformer, export_static_quantized_openvino_model

    copy = st_copy(args, "st-openvino-base")
    quantized = "openvino/openvino_model_qint8_quantized.xml"
    if not (copy / quantized).exists():
        model = SentenceTransformer(str(copy), backend="openvino", device="cpu")
        model.save_pretrained(str(copy))  # writes openvino/openvino_model.xml
        calibration = Path(args.work) / "st-calibration"
        calibration.mkdir(exist_ok=True)
        texts = json.loads(Path(args.texts_file).read_text())["calibration"]
        (calibration / "train.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
        export_static_quantized_openvino_model(model, None, str(copy), dataset_name=str(calibration),
                                               dataset_config_name="default", dataset_split="train",
                                               column_name="sentence")
    return SentenceTransformer(str(copy), backend="openvino", device="cpu", model_kwargs={"file_name": quantized})


def avx512_vnni() -> bool:
    return "avx512_vnni" in Path("/proc/cpuinfo").read_text()


def our_embed(args, row: str):
    """(embed function of texts and domains, the seconds spent loading and exporting before it, the batch size).
    Exports land in a cache inside the run's work folder: the first call exports, later ones reuse."""
    os.environ["MOEBERT_CACHE"] = str(Path(args.work) / "cache")
    import torch

    from moebert.encoders.options import EncodingOptions
    from moebert.encoders.export.cache import cached_export_encoder
    from moebert.encoders.interface import embed
    from moebert.search.index import EMBEDDED_MODEL, index_encoder

    started = time.perf_counter()
    backend, precision = row.split("-")
    options = EncodingOptions("torch", "fp32", args.batch_size, args.max_seq_length, "cpu")
    encoder, _, fingerprint = index_encoder(args.model or EMBEDDED_MODEL, options)
    if backend in EXPORTED:  # the model's cached export, int8 or fp32
        model = encoder.model
        encoder = cached_export_encoder(fingerprint, lambda: (model, encoder.tokenizer), args.max_seq_length,
                                        args.batch_size or 8, backend, "none" if precision == "fp32" else "int8")
    setup = time.perf_counter() - started
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(texts, domains):
        with autocast:
            return embed(encoder, texts, domains)

    return run, setup, encoder.batch_size


def run_row(args):
    texts_and_domains = json.loads(Path(args.texts_file).read_text())
    texts, domains = texts_and_domains["texts"], texts_and_domains["domains"]
    if args.prepare:  # the export, in a process of its own: its memory is not the encoding's
        print(json.dumps({"setup": our_embed(args, args.row)[1]}))
        return
    if args.row.startswith("st-"):
        model = sentence_transformer(args, args.row)
        model.max_seq_length = args.max_seq_length
        setup, batch_size = 0.0, args.batch_size or 32  # sentence-transformers' default

        def run(texts, domains):
            return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    else:
        run, setup, batch_size = our_embed(args, args.row)
    first_of_each_domain = sorted({d: i for i, d in reversed(list(enumerate(domains)))}.values())
    run([texts[i] for i in first_of_each_domain], [domains[i] for i in first_of_each_domain])  # lazy loads, first calls
    started = time.perf_counter()
    vectors = run(texts, domains)
    seconds = time.perf_counter() - started
    np.save(Path(args.work) / f"{args.row}.npy", np.asarray(vectors, dtype=np.float32))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "setup": setup, "peak_mib": peak, "batch_size": batch_size}))


# ------------------------------------------------------------------------------------------------ the table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=None, help="default: each row's own (32; ours exported 8)")
    parser.add_argument("--model", default=None, help="a MoE-BERT (default: the embedded base upcycled)")
    parser.add_argument("--st_onnx_python", default=None, help="python of an environment with "
                        "benchmarks/requirements-st-onnx.txt installed, for sentence-transformers' ONNX row")
    parser.add_argument("--st_openvino_python", default=None, help="python of an environment with "
                        "benchmarks/requirements-st-openvino.txt installed, for sentence-transformers' OpenVINO rows")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a child process: run this row
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # a child process: export only
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--texts_file", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return run_row(args)

    import torch

    from moebert.device import bf16_is_native
    from moebert.names import default_base_model
    from moebert.data.pairs import sample_papers

    shipped = sample_papers()
    papers, calibration = shipped.head(args.texts), shipped.iloc[args.texts : args.texts + 300]
    bf16 = bf16_is_native("cpu")
    print(f"{len(papers)} SYNERGY abstracts, {args.max_seq_length} tokens at most, "
          f"{torch.get_num_threads()} threads; bf16 native on this CPU: {bf16}; AVX512-VNNI: {avx512_vnni()}")
    rows = [r for r in args.rows.split(",") if r in ROWS and (r != "torch-bf16" or bf16)]
    for row, flag in OWN_PYTHON.items():
        if row in rows and not getattr(args, flag):
            print(f"skipping {ROWS[row]}: give --{flag} (see its requirements file in benchmarks/)")
            rows.remove(row)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        texts_file = Path(work) / "texts.json"
        texts_file.write_text(json.dumps({"texts": papers["text"].tolist(), "domains": papers["domain"].tolist(),
                                          "calibration": calibration["text"].tolist()}))
        for row in rows:
            if row in COMMAND_FLAGS:
                print(f"running {ROWS[row]} ...", flush=True)
                results[row] = index_command(row, papers, work)
                continue
            python = getattr(args, OWN_PYTHON[row]) if row in OWN_PYTHON else sys.executable
            command = [python, "-m", "benchmarks.bench_encode", "--row", row, "--work", work, "--texts_file", str(texts_file),
                       "--base", default_base_model(), "--max_seq_length", str(args.max_seq_length),
                       ] + (["--batch_size", str(args.batch_size)] if args.batch_size else []) + (
                       ["--model", args.model] if args.model else [])
            print(f"running {ROWS[row]} ...", flush=True)
            prepared = child(command + ["--prepare"]) if row.startswith(EXPORTED) else {}
            results[row] = child(command)
            if results[row] is None:
                del results[row]
                continue
            results[row] |= prepared or {}
            results[row]["vectors"] = np.load(Path(work) / f"{row}.npy")
        print_table(results, len(papers))


def index_command(row: str, papers, work: str) -> dict:
    """`search.py index` on these papers as a user runs it, timed from start to end in a process of its own (its
    exports cached in the work folder: the first such row exports); its vectors read back from the index, in order."""
    papers_file = Path(work) / "papers.parquet"
    if not papers_file.exists():
        papers.to_parquet(papers_file)
    out = Path(work) / f"index-{row}"
    command = [sys.executable, "search.py", "index", "--papers", str(papers_file), "--output_dir", str(out),
               *COMMAND_FLAGS[row]]
    env = os.environ | {"MOEBERT_CACHE": str(Path(work) / "command-cache")}
    log, err = Path(work) / f"{row}.out", Path(work) / f"{row}.err"
    started = time.perf_counter()
    with open(log, "w") as stdout_file, open(err, "w") as stderr_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout_file, stderr=stderr_file)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own peak memory
    seconds = time.perf_counter() - started
    stdout, stderr = log.read_text(), err.read_text()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-2000:]}")
    stages = [line.strip() for line in stderr.splitlines() if re.match(r"^\s*\d+\.\d s  ", line)]
    vectors = np.concatenate([np.load(f) for f in sorted((out / "chunks").glob("*.npy"))])
    return {"seconds": seconds, "setup": 0.0, "peak_mib": usage.ru_maxrss / 1024, "vectors": vectors,
            "batch_size": 32 if stdout.startswith("backend torch") else 8, "first_line": stdout.splitlines()[0],
            "stages": stages}


def child(command: list[str]) -> dict | None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        print(f"  failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict, count: int):
    reference = results.get("st-fp32", {}).get("seconds")
    print(f"\n{'':36} {'texts/s':>8} {'vs ST fp32':>10} {'min cos to fp32 twin':>21} {'peak MiB':>9} {'batch':>6} {'export s':>9}")
    for row, result in results.items():
        ratio = f"{reference / result['seconds']:9.2f}x" if reference else f"{'':>10}"
        twin = results.get(TWIN.get(row))
        cosine = f"{(result['vectors'] * twin['vectors']).sum(axis=1).min():21.5f}" if twin else f"{'':>21}"
        export = f"{result['setup']:9.1f}" if row.startswith(EXPORTED) else ""
        print(f"{ROWS[row]:36} {count / result['seconds']:8.1f} {ratio} {cosine} {result['peak_mib']:9.0f} {result['batch_size']:6} {export}")
    for row, result in results.items():
        if "stages" in result:
            print(f"\n{ROWS[row]}, {result['seconds']:.1f} s: {result['first_line']}\n  " + "\n  ".join(result["stages"]))


if __name__ == "__main__":
    main()
