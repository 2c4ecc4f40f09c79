"""One specialist per domain as one encoder (the paper's strategy 1): a folder whose every subfolder is a MoE-BERT
trained for one domain alone (`train.py --specialist DOMAIN --output_dir FOLDER/DOMAIN`); each domain's texts go
through its own specialist, loaded when first needed."""

import json
from pathlib import Path
from types import SimpleNamespace

from moebert.encoders.interface import Encoder, UnknownDomainError


def specialist_folders(folder) -> dict[str, Path] | None:
    """{domain: its specialist's folder} when `folder` holds one-domain MoE-BERTs (and is no model itself), else
    None; two specialists of one domain are refused, since which one answers would be a guess."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    found: dict[str, Path] = {}
    for config_file in sorted(folder.glob("*/config.json")):
        config = json.loads(config_file.read_text())
        if config.get("model_type") != "moebert" or len(config.get("domains", [])) != 1:
            continue
        (domain,) = config["domains"]
        if domain in found:
            raise ValueError(f"{folder}: two specialists of domain {domain!r} ({found[domain].name}/ and "
                             f"{config_file.parent.name}/); keep one")
        found[domain] = config_file.parent
    return found or None


class SpecialistsEncoder(Encoder):
    """Routes each domain to its specialist (`load(folder) -> Encoder`); `config` has the domains and every
    specialist's calibration, so scoring and search treat the set as one MoE-BERT."""

    routes_by_domain = True

    def __init__(self, folders: dict[str, Path], load):
        self.folders, self._load, self._encoders = folders, load, {}
        parameters = {}
        for domain, folder in folders.items():
            calibration = json.loads((folder / "config.json").read_text()).get("calibration") or {}
            parameters |= {d: p for d, p in calibration.get("parameters", {}).items() if d == domain}
        calibration = {"method": "platt", "fitted_on": "valid", "fitted_by": "train.py", "parameters": parameters}
        self.config = SimpleNamespace(domains=list(folders), calibration=calibration if parameters else None)

    def specialist(self, domain: str) -> Encoder:
        if domain not in self.folders:
            raise UnknownDomainError(f"domain {domain!r} has no specialist here; these domains have one: "
                                     f"{list(self.folders)}")
        if domain not in self._encoders:
            self._encoders[domain] = self._load(str(self.folders[domain]))
        return self._encoders[domain]

    @property
    def device(self) -> str:
        return next((e.device for e in self._encoders.values()), "cpu")

    def encode(self, texts: list[str], domain: str):
        return self.specialist(domain).encode(texts, domain)

    def cocitation_probability(self, cosine: float, domain: str) -> float:
        return self.specialist(domain).cocitation_probability(cosine, domain)
