"""Score how well cosine similarity of abstract embeddings separates co-cited pairs from random pairs.

    python eval.py --bootstrap 1000                   # embedded default (SYNERGY): base model and TF-IDF, and
                                                      # the models train.py wrote to outputs/moebert and
                                                      # outputs/shared-expert if present; gains over the base
                                                      # with 95% intervals
    python eval.py --model ours=path/or/hub-id --model tfidf --dataset CVD=GleghornLab/abstract_domain_cvd
    python eval.py calibrate --model outputs/moebert  # fit a MoE-BERT's co-citation probabilities on valid

Models: a MoE-BERT checkpoint (each pair routed to its domain's expert), any Hugging Face encoder (mean pooling
over non-padding tokens), or `tfidf`. Each unique text is encoded once per model and domain. Metrics per domain
and pooled (`all`): the paper's protocol (threshold chosen on the evaluated split itself) and, for `--split test`,
the honest protocol (threshold chosen on `valid`, applied to `test`); plus a retrieval view (MRR, Recall@10,
nDCG@10). With `--bootstrap N`, each model's gain over `--reference` (default: the base model) in mean-over-domains
and pooled ROC-AUC and F1max, with a 95% paired bootstrap interval (the same resampled pairs for both models,
drawn within each domain and label). Writes `results.json`, `predictions.csv`, a markdown table and PNG plots into
`--output_dir`.
"""

import argparse
import json
import sys
from pathlib import Path

from moebert.atomic import write_file
from moebert.data.pairs import DatasetError, load_domain_dataset, parse_dataset_specs
from moebert.device import autocast
from moebert.encoders.loader import load_encoder
from moebert.encoders.options import EncodingOptions, add_encoding_arguments
from moebert.evaluation import report as eval_report
from moebert.evaluation.calibration import calibrated, calibration_report, describe, fit_calibration
from moebert.evaluation.scoring import evaluate_model, scored_metrics
from moebert.loading import RemoteCodeError
from moebert.logs import show_logs
from moebert.names import DEFAULT_OUTPUT_DIR, SHARED_EXPERT_DIR, default_base_model

TRAINED = {"moebert": DEFAULT_OUTPUT_DIR, "shared": SHARED_EXPERT_DIR}  # evaluated by default where train.py wrote them


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="NAME=PATH_OR_HUB_ID, PATH_OR_HUB_ID, or tfidf; repeatable")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    add_encoding_arguments(parser)
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="let a model that is no MoE-BERT run Python code from its own "
        "repository (MoE-BERT folders are loaded with this project's classes and never need it)",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("eval_results"))
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="resamples for the gains' 95%% intervals")
    parser.add_argument(
        "--reference", action="append", metavar="NAME", help="model the gains are measured against, repeatable "
        "(default: base and, when evaluated, shared, the one-expert baseline; else the first model)",
    )
    args = parser.parse_args(argv)
    args.models = parse_model_specs(args.model)
    args.references = args.reference or [r for r in ("base", "shared") if r in args.models] or list(args.models)[:1]
    unknown = [r for r in args.references if r not in args.models]
    if args.bootstrap and unknown:
        parser.error(f"--reference {unknown[0]!r} is not one of the models {list(args.models)}; name it with --model "
                     "NAME=PATH.")
    try:
        needed = tuple(dict.fromkeys(("train", "valid", args.split)))
        args.datasets = {d: load_domain_dataset(src, needed, d) for d, src in parse_dataset_specs(args.dataset).items()}
    except DatasetError as error:
        parser.error(str(error))
    return args


def parse_model_specs(specs: list[str] | None) -> dict[str, str]:
    """`NAME=PATH`, `PATH` or `tfidf` -> {label: path}; none -> base model, TF-IDF, and the trained defaults."""
    if not specs:
        trained = [f"{label}={path}" for label, path in TRAINED.items() if path.exists()]
        specs = trained + [f"base={default_base_model()}", "tfidf"]
    models = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        label, path = (label, path) if sep and not Path(spec).exists() else (Path(spec).name or spec, spec)
        models[label] = path
    return models


def score_model(label: str, path: str, args, options: EncodingOptions, results: dict, predictions: dict):
    """Encode and score one model into `results` and `predictions` ((label, domain) -> (scores, labels)); a model's
    stored calibration is scored beside its cosines, as `<label> (calibrated)`."""
    print(f"model {label}: {path}")
    try:
        encoder = load_encoder(path, options, args.trust_remote_code)
    except RemoteCodeError:
        raise
    except (OSError, ValueError) as error:  # unknown id, no network, not a model folder
        print(f"  skipped: cannot load {path}: {error}", file=sys.stderr)
        results[label] = {"all": {"error": f"cannot load {path}: {error}"}}
        return
    with autocast(options.device, options.dtype):
        results[label], scored = evaluate_model(encoder, args.datasets, args.split)
    predictions |= {(label, domain): arrays[args.split] for domain, arrays in scored.items()}
    if args.split == "test" and scored:
        stored = encoder.config.calibration if encoder.config is not None else None
        calibration = stored or fit_calibration(scored, "eval.py")
        results[label]["calibration"] = calibration_report(scored, args.split, calibration)
        if stored:  # the model's own probabilities, scored beside its cosines (and against the references)
            probabilities = calibrated(scored, args.split, calibration)
            results[f"{label} (calibrated)"] = scored_metrics(probabilities)
            predictions |= {(f"{label} (calibrated)", domain): arrays for domain, arrays in probabilities.items()}


def report(args, results: dict, predictions: dict) -> str:
    """Tables (with bootstrap gains), results.json, predictions.csv and plots in --output_dir; returns the tables."""
    metrics = [m for m in eval_report.TABLE_METRICS if args.split == "test" or m != "f1_at_valid_threshold"]
    tables = "\n\n".join(eval_report.markdown_table(results, m) for m in metrics)
    if any("calibration" in r for r in results.values()):
        tables += "\n\n" + eval_report.calibration_table(results)
    scored_references = [r for r in args.references if any(label == r for label, _ in predictions)]
    if args.bootstrap and scored_references:
        gains = eval_report.bootstrap_gains(predictions, scored_references, args.bootstrap)
        for model, per_reference in gains.items():
            results[model]["bootstrap"] = {"resamples": args.bootstrap} | per_reference
        tables += "\n\n" + eval_report.gains_table(gains) + "\n\n" + eval_report.domain_gains_table(gains)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_file(args.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    eval_report.write_predictions(args.output_dir / "predictions.csv", predictions)
    eval_report.plot(predictions, results, args.output_dir)
    eval_report.plot_reliability(results, predictions, args.output_dir)
    write_file(args.output_dir / "results.md", tables + "\n")
    return tables


def calibrate(argv: list[str]) -> dict:
    """`python eval.py calibrate --model FOLDER`: fit a MoE-BERT's per-domain calibration on `valid` and store it
    in the folder's config.json."""
    parser = argparse.ArgumentParser(prog="eval.py calibrate", description=calibrate.__doc__)
    parser.add_argument("--model", required=True, help="a local MoE-BERT folder (its config.json is rewritten)")
    parser.add_argument("--dataset", action="append", help="DOMAIN=SOURCE, repeatable (default: embedded sample)")
    add_encoding_arguments(parser)
    args = parser.parse_args(argv)
    options = EncodingOptions.from_args(args)
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        parser.error(f"--model {args.model}: give a local model folder; the calibration is written into its config.json.")
    encoder = load_encoder(args.model, options)
    if not encoder.routes_by_domain:
        parser.error(f"--model {args.model} is no MoE-BERT; for other models eval.py fits a calibration on valid itself.")
    try:
        datasets = {d: load_domain_dataset(src, ("train", "valid"), d) for d, src in parse_dataset_specs(args.dataset).items()}
    except DatasetError as error:
        parser.error(str(error))
    with autocast(options.device, options.dtype):
        _, scored = evaluate_model(encoder, datasets, "valid")
    calibration = fit_calibration(scored, "eval.py calibrate")
    encoder.config.calibration = calibration
    write_file(folder / "config.json", encoder.config.to_json_string())
    for domain, (a, b) in calibration["parameters"].items():
        print(f"{domain}: {describe(a, b)}")
    print(f"calibration written to {folder / 'config.json'}")
    return calibration


def main(argv=None):
    show_logs()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["calibrate"]:
        return calibrate(argv[1:])
    args = parse_args(argv)
    options = EncodingOptions.from_args(args)
    results, predictions = {}, {}
    for label, path in args.models.items():
        try:
            score_model(label, path, args, options, results, predictions)
        except RemoteCodeError as error:
            print(f"eval.py: error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    tables = report(args, results, predictions)
    print(f"\n{tables}\n\nwritten to {args.output_dir}/ (results.json, results.md, predictions.csv, plots)")
    return results


if __name__ == "__main__":
    main()
