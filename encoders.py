"""Encoders that turn texts into vectors, shared by training (valid scores), evaluation, search and the benchmarks.

Every encoder has `fit(train_texts)` and `encode(texts, domain) -> array`: a MoE-BERT routes each text to its
domain's expert, other models ignore the domain. Also the device and precision helpers they run under.

No Python is run from a model folder unless asked: a MoE-BERT is loaded with this project's own classes (the
`modeling_moebert.py` shipped in the folder is not imported), and any other model that needs its own code is
refused unless `trust_remote_code=True`.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


DEFAULT_BATCH_SIZE = 32  # texts per forward pass on torch when the caller gives None
BATCH_SIZE_HELP = "texts per forward pass (default: 32 on torch, 8 on ONNX Runtime, where less padding pays)"


class RemoteCodeError(ValueError):
    """A model that needs Python code from its own folder or repo, which was not allowed."""


def load_moebert(name_or_path: str):
    """(model, tokenizer) of a saved MoE-BERT, built by this project's classes: nothing in the folder is executed."""
    from transformers import AutoTokenizer

    from modeling_moebert import MoEBertModel

    from safetensors import SafetensorError

    try:
        model = MoEBertModel.from_pretrained(name_or_path)
    except SafetensorError as error:
        raise ValueError(
            f"{name_or_path}: its weights cannot be read ({error}): the file is truncated or corrupt; download or copy "
            "it again."
        ) from None
    return model, AutoTokenizer.from_pretrained(name_or_path, config=model.config)  # no AutoConfig, no custom code


def is_moebert(name_or_path: str) -> bool:
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(name_or_path)  # local folder or Hub id; OSError when neither
    return config.get("model_type") == "moebert"


def _refuse_remote_code(name_or_path: str, error: Exception):
    if "trust_remote_code" in str(error):
        raise RemoteCodeError(
            f"{name_or_path} needs Python code from its own repository to load; pass --trust_remote_code if you "
            "trust it (MoE-BERT folders never need it)."
        ) from None
    raise error


class TransformerEncoder:
    """A MoE-BERT (texts get their domain token) or a plain encoder (mean pooling over non-padding tokens)."""

    def __init__(self, model, tokenizer, max_seq_length: int, batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.is_moebert = getattr(model.config, "model_type", None) == "moebert"
        self.max_seq_length, self.batch_size = max_seq_length, batch_size or DEFAULT_BATCH_SIZE

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, max_seq_length: int, batch_size: int, device: str = "cpu", trust_remote_code=False
    ):
        from transformers import AutoModel, AutoTokenizer

        if is_moebert(name_or_path):
            model, tokenizer = load_moebert(name_or_path)
        else:
            try:
                model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
                tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            except ValueError as error:
                _refuse_remote_code(name_or_path, error)
        return cls(model.to(device).eval(), tokenizer, max_seq_length, batch_size)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> str:
        return str(self.model.device)

    def cocitation_probability(self, cosine: float, domain: str) -> float:
        return float(self.model.cocitation_probability(cosine, domain))

    def fit(self, train_texts):
        pass

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        if self.is_moebert:
            texts = self.model.prepend_domain_token(texts, domain)  # unknown domain: ValueError naming the known

        def run(batch_texts):
            batch = self.tokenizer(
                batch_texts, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            ).to(self.model.device)
            if self.is_moebert:  # by name, in either routing mode (token routing would read the all-zero segments)
                batch["domain_ids"] = torch.full(
                    (len(batch_texts),), self.model.config.domain_index(domain), device=self.model.device
                )
            with torch.inference_mode():
                output = self.model(**batch)
            return self._pool(output, batch["attention_mask"]).float().cpu().numpy()

        return encode_in_batches(texts, self.batch_size, self.model.config.hidden_size, f"encoding {domain}", run)

    def _pool(self, output, attention_mask):
        if self.is_moebert:
            return output.pooler_output
        mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
        return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode_in_batches(texts: list[str], batch_size: int, dimension: int, description: str, run, lengths=None):
    """The vectors of `texts` in their order, computed `batch_size` at a time by `run(batch_texts) -> array`,
    longest first (by `lengths`, default the characters): similar lengths share a batch, so little padding."""
    order = np.argsort([-n for n in (lengths or map(len, texts))], kind="stable")
    vectors = np.zeros((len(texts), dimension), dtype=np.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc=description, unit="batch", leave=False):
        index = order[start : start + batch_size]
        vectors[index] = run([texts[i] for i in index])
    return vectors


class StemEncoder:
    """A MoE-BERT over stored stem states (stem_cache.StemStates): each text is encoded from the first MoE layer's
    experts up, which is what the model computes from the text (it must be among the stored inputs). Training scores
    `valid` with it while the stem is frozen."""

    def __init__(self, model, stems, batch_size: int):
        self.model, self.stems, self.batch_size = model, stems, batch_size

    def fit(self, train_texts):
        pass

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        domain_id = self.model.config.domain_index(domain)

        def run(batch_texts):
            batch = self.stems.batch([(domain_id, t) for t in batch_texts])
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            domain_ids = torch.full((len(batch_texts),), domain_id, device=self.model.device)
            with torch.inference_mode():
                return self.model(**batch, domain_ids=domain_ids).pooler_output.float().cpu().numpy()

        lengths = [self.stems.length((domain_id, t)) for t in texts]  # stored token counts
        return encode_in_batches(texts, self.batch_size, self.model.config.hidden_size, f"encoding {domain}", run, lengths)


class SentenceTransformerEncoder:
    """A sentence-transformers model (a repo with `modules.json`), encoded with its own pooling and normalisation:
    mean pooling would be wrong for models trained with CLS or last-token pooling."""

    def __init__(self, name_or_path: str, max_seq_length: int, batch_size: int, device: str = "cpu", trust_remote_code=False):
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(name_or_path, trust_remote_code=trust_remote_code, device=device)
        except ValueError as error:
            _refuse_remote_code(name_or_path, error)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE

    def fit(self, train_texts):
        pass

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=True)


class TfidfEncoder:
    """The classic reference: TF-IDF vectors fitted on the domain's training texts."""

    def __init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")

    def fit(self, train_texts):
        self.vectorizer.fit(train_texts)

    def encode(self, texts, domain):
        return self.vectorizer.transform(texts)


BACKENDS = ("torch", "onnx")


def load_encoder(
    spec: str, max_seq_length: int, batch_size: int, device: str, trust_remote_code: bool = False, backend: str = "torch"
):
    """`tfidf`; a MoE-BERT; a sentence-transformers model (has modules.json); else any encoder, mean-pooled. An ONNX
    export of a MoE-BERT, and with `backend="onnx"` a MoE-BERT itself, run on ONNX Runtime (see onnx_backend); other
    models on torch."""
    from transformers.utils import cached_file

    from onnx_backend import is_export, load_onnx_encoder

    if spec == "tfidf":
        return TfidfEncoder()
    if is_export(spec) or (backend == "onnx" and is_moebert(spec)):
        return load_onnx_encoder(spec, max_seq_length, batch_size)
    if not is_moebert(spec) and cached_file(spec, "modules.json", _raise_exceptions_for_missing_entries=False):
        return SentenceTransformerEncoder(spec, max_seq_length, batch_size, device, trust_remote_code)
    return TransformerEncoder.from_pretrained(spec, max_seq_length, batch_size, device, trust_remote_code)


def model_fingerprint(name_or_path: str) -> str:
    """What names a model's weights: a Hub id with its commit, or a hash of a local folder's weight files."""
    from transformers import PretrainedConfig

    if Path(name_or_path).is_dir():
        return weights_fingerprint(name_or_path)
    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    return f"{name_or_path}@{config.get('_commit_hash')}"


def weights_fingerprint(folder: str, domains: list[str] = ()) -> str:
    """sha256 over the folder's weight files (and the domains of a model upcycled from them): same vectors, same
    print."""
    digest = hashlib.sha256(json.dumps(list(domains)).encode())
    for weights in sorted(Path(folder).glob("*.safetensors")):
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def normalise(vectors):
    """Unit-length rows; sparse TF-IDF rows (already unit length) as CSR."""
    if hasattr(vectors, "multiply"):
        return vectors.tocsr()
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------------ device, precision


def default_device() -> str:
    """The accelerator when there is one: every transformer model of a comparison runs on the same device."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def default_backend(device: str) -> str:
    """ONNX Runtime with int8 weights on a CPU, where it measured faster than torch (also than torch under bf16) at
    equal quality (docs/speed.md); torch on an accelerator."""
    return "onnx" if device == "cpu" else "torch"


def bf16_is_native(device: str) -> bool:
    """Whether this device computes bf16 matrix products natively: a CUDA device of compute capability 8.0 or newer
    (Ampere+; older GPUs emulate bf16, slowly), an x86 CPU with AVX512-BF16 or AMX. Elsewhere bf16 is slower than
    fp32."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    cpuinfo = Path("/proc/cpuinfo")
    return device == "cpu" and cpuinfo.exists() and bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.read_text().split()))


def autocast(device: str, precision: str):
    """bf16 autocast for `bf16`, and for `auto` where bf16 is native (else fp32, and says so); fp32 for `fp32`."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_native(device))
    if precision == "auto" and not use_bf16:
        print(f"encoding in fp32: bf16 is not native on {device}", file=sys.stderr)
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16)
