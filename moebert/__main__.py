"""MoEBERT's model tools: `python -m moebert COMMAND`.

    python -m moebert compose --base sentence-transformers/all-MiniLM-L6-v2 --expert org/a:CVD --expert org/b:ONC \
                              --output_dir outputs/composed [--push_to_hub --hub_model_id ORG/NAME]
    python -m moebert export --model outputs/moebert --output_dir outputs/moebert-ov [--runtime openvino|onnx]
                             [--quantize int8|none] [--domains Chou_2004,Oud_2018]

compose: one model from domain experts published separately (each `experts/DOMAIN.safetensors` of a Hub repo, or
a local expert file), on a base that is upcycled, or a MoE-BERT; each expert must have been trained on the base's
shared weights (the experts-only recipe), so that every domain computes what its publisher's model computed.
export: each domain's expert as a graph for OpenVINO or ONNX Runtime (int8 by default) with the tokenizer and the
model's config, for `eval.py` and `search.py` (`--model DIR`, or `--backend openvino|onnx` with the model itself).
"""

import argparse
import tempfile
from pathlib import Path

from moebert.encoders.export.cache import check_moebert, training_data_of
from moebert.encoders.export.manifest import QUANTIZE_CHOICES
from moebert.encoders.export.runtimes import RUNTIMES, export
from moebert.loading import load_moebert, model_fingerprint
from moebert.logs import show_logs
from moebert.models.composition import compose, save_composed
from moebert.models.hub import HubPusher, push_refusal
from moebert.names import public_name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moebert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help="export each domain's expert to OpenVINO or ONNX Runtime")
    command.add_argument("--model", required=True, help="a MoE-BERT folder or Hub id")
    command.add_argument("--output_dir", required=True)
    command.add_argument("--runtime", default="onnx", choices=list(RUNTIMES), help="openvino: int8 weights and "
                         "activations (NNCF, calibrated on the model's training texts); onnx: int8 weights (default)")
    command.add_argument("--quantize", default="int8", choices=QUANTIZE_CHOICES, help="int8 (default) or fp32")
    command.add_argument("--domains", default=None, help="comma-separated domains to export (default: all)")
    command = commands.add_parser("compose", help="one model from domain experts published separately")
    command.add_argument("--base", required=True, help="the BERT the experts were upcycled from (Hub id or folder), or "
                         "a MoE-BERT to add them to")
    command.add_argument("--expert", action="append", required=True, metavar="ORG/REPO[@REVISION]:DOMAIN",
                         help="a domain's expert: experts/DOMAIN.safetensors of a Hub repo, or a local expert file; "
                         "repeatable")
    command.add_argument("--output_dir", required=True)
    command.add_argument("--allow_other_shared_weights", action="store_true", help="load experts trained on other "
                         "shared weights anyway (they then compute something their publishers did not measure; the "
                         "card says so)")
    command.add_argument("--push_to_hub", action="store_true")
    command.add_argument("--hub_model_id", default=None, help="ORG/NAME")
    command.add_argument("--hub_private_repo", action="store_true")
    command.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)
    refusal = args.command == "compose" and push_refusal(args.push_to_hub, args.hub_model_id)
    if refusal:
        parser.error(refusal)
    return args


def export_command(args):
    try:
        check_moebert(args.model)
        model, tokenizer = load_moebert(args.model)
        domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
        folder = export(model, tokenizer, model_fingerprint(args.model), args.output_dir, args.quantize, domains,
                        source=public_name(args.model), runtime=args.runtime, training_data=training_data_of(args.model))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}") from None
    count = len(domains or model.config.domains)
    print(f"exported {count} domain(s) of {args.model} to {folder} ({args.runtime}, {args.quantize})")
    return folder


def compose_command(args):
    try:
        model, tokenizer = compose(args.base, args.expert, args.allow_other_shared_weights)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}") from None
    folder = save_composed(model, tokenizer, Path(args.output_dir), args.hub_model_id or Path(args.output_dir).name)
    for domain, source in model.config.expert_sources.items():
        print(f"{domain}: {source['source']}{'@' + source['revision'] if source.get('revision') else ''}, shared "
              f"weights {source['shared_weights']}")
    print(f"composed model of {len(model.config.domains)} domains written to {folder}")
    if args.push_to_hub:
        with tempfile.TemporaryDirectory() as staging:
            pusher = HubPusher(args.hub_model_id, Path(staging), token=args.hub_token, private=args.hub_private_repo)
            pusher.push(folder, "", "Composed model")
            pusher.finish()
    return folder


def main(argv=None):
    show_logs()
    args = parse_args(argv)
    return {"export": export_command, "compose": compose_command}[args.command](args)


if __name__ == "__main__":
    main()
