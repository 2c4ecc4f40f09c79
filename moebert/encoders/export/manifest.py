"""What an export folder holds and how it says so: one graph per domain, the tokenizer, the MoE-BERT's config (domains,
calibration) and `export_manifest.json`, which names the runtime and the fingerprint of the weights exported. Every
graph carries the same fingerprint and its domain in its own metadata (`stamp`), so a graph of another model or
another domain is refused; `Runtime` is what each runtime module supplies."""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MANIFEST = "export_manifest.json"
LEGACY_MANIFEST = "onnx_manifest.json"  # what exports of format 1 were marked by (ONNX Runtime and OpenVINO alike)
EXPORT_FORMAT = 2  # part of the cache key: a change to what a graph computes or a folder holds must not reuse older exports
QUANTIZE_CHOICES = ("int8", "none")
STAMP_KEYS = ("moebert.fingerprint", "moebert.domain", "moebert.quantize")


class ExportError(ValueError):
    """An export that cannot serve what was asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class Runtime:
    """One runtime an export can target. `write_graph(model, tokenizer, domain, path, quantize, stamp, calibration)`
    writes one domain's graph (`calibration`: (texts, where they come from) for a runtime that quantizes
    activations, None otherwise); `calibration_texts`: how many it wants for int8 (0: none); `encoder` reads an
    export folder of this runtime."""

    name: str
    suffix: str
    write_graph: Callable
    encoder: type
    versions: Callable[[], dict]
    calibration_texts: int = 0


def stamp(fingerprint: str, domain: str, quantize: str) -> dict:
    """The metadata every graph carries, checked when it is opened."""
    return dict(zip(STAMP_KEYS, (fingerprint, domain, quantize)))


def graph_file_name(index: int, domain: str, suffix: str) -> str:
    return f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', domain)}{suffix}"


def is_export(folder) -> bool:
    """Whether `folder` is an export folder (of this format or an older one, which read_manifest refuses)."""
    return any((Path(folder) / name).is_file() for name in (MANIFEST, LEGACY_MANIFEST))


def read_manifest(folder: Path) -> dict:
    export_again = "export the model again"
    if (folder / LEGACY_MANIFEST).is_file() and not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder} was written by an earlier version of the exporter (format 1, {LEGACY_MANIFEST}): "
                          f"{export_again}.")
    if not (folder / MANIFEST).is_file():
        raise ExportError(f"{folder} is no export of a MoE-BERT (no {MANIFEST}); write one with "
                          "`python -m moebert export --model MODEL --output_dir DIR`.")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{folder} was written by another version of the exporter (format "
                          f"{manifest.get('format')}, this one reads {EXPORT_FORMAT}): {export_again}.")
    return manifest
