"""MoEBERT's model tools: `python -m moebert COMMAND`.

    python -m moebert export --model outputs/moebert --output_dir outputs/moebert-onnx [--quantize int8|none]
                             [--domains Chou_2004,Oud_2018]

export: each domain's expert as an ONNX graph (int8 weights by default) with the tokenizer and the model's
config, for `eval.py` and `search.py` (`--model DIR`, or `--backend onnx` with the model itself).
"""

import argparse

from moebert.loading import load_moebert, model_fingerprint
from moebert.names import public_name
from moebert.onnx_export import QUANTIZE_CHOICES, check_moebert, export


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moebert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("export", help="export each domain's expert to ONNX")
    command.add_argument("--model", required=True, help="a MoE-BERT folder or Hub id")
    command.add_argument("--output_dir", required=True)
    command.add_argument("--quantize", default="int8", choices=QUANTIZE_CHOICES, help="int8 weights (default) or fp32")
    command.add_argument("--domains", default=None, help="comma-separated domains to export (default: all)")
    return parser.parse_args(argv)


def export_command(args):
    try:
        check_moebert(args.model)
        model, tokenizer = load_moebert(args.model)
        domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
        folder = export(model, tokenizer, model_fingerprint(args.model), args.output_dir, args.quantize, domains,
                        source=public_name(args.model))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {str(error).splitlines()[0]}") from None
    print(f"exported {len(domains or model.config.domains)} domain(s) of {args.model} to {folder} ({args.quantize})")
    return folder


def main(argv=None):
    args = parse_args(argv)
    return {"export": export_command}[args.command](args)


if __name__ == "__main__":
    main()
