import atexit
import importlib.util
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # on the path by pyproject.toml's pytest settings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MOEBERT_CACHE" not in os.environ:  # exports stay out of ~/.cache, and go with the run
    os.environ["MOEBERT_CACHE"] = tempfile.mkdtemp(prefix="moebert-cache-")
    atexit.register(shutil.rmtree, os.environ["MOEBERT_CACHE"], ignore_errors=True)

from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertModel,
    MPNetConfig,
    MPNetModel,
    MPNetTokenizerFast,
    RobertaConfig,
    RobertaModel,
)

from modeling_moebert import MoEBertModel  # noqa: E402
from moebert.encoders.loader import load_encoder
from moebert.encoders.options import EncodingOptions  # noqa: E402
from moebert.logs import CONSOLE  # noqa: E402
from moebert.names import default_base_model as minilm_path  # noqa: E402

DOMAINS = ["CVD", "COPD", "SKIN", "PARA", "AUTO"]


def python_path() -> str:
    """PYTHONPATH for a subprocess that imports the repository as a script would: the root first, and whatever the
    environment already had after it (a GPU image's carried packages live there: replacing it loses them)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def needs_shared(path: Path):
    """Skip a test whose input from ../shared is not beside this checkout, unless MOEBERT_REQUIRE_SHARED is set
    (.ci/run sets it where ../shared is there): then a missing input fails the run instead of skipping silently."""
    if path.exists():
        return
    if os.environ.get("MOEBERT_REQUIRE_SHARED"):
        pytest.fail(f"{path} is missing, though ../shared is beside this checkout (MOEBERT_REQUIRE_SHARED is set)")
    pytest.skip(f"{path} is not beside this checkout")


def requires(package: str, why: str):
    """The mark of a test that needs a package requirements.txt installs but a bare GPU image may lack (faiss,
    openvino): skipped where it is missing, unless MOEBERT_REQUIRE_PACKAGES is set (.ci/run sets it), where a missing
    package stops the run instead of being skipped silently."""
    missing = importlib.util.find_spec(package) is None
    if missing and os.environ.get("MOEBERT_REQUIRE_PACKAGES"):
        raise RuntimeError(f"{package} is not installed, though MOEBERT_REQUIRE_PACKAGES is set: pip install -r "
                           "requirements.txt")
    return pytest.mark.skipif(missing, reason=f"{package} is not installed: {why}")


requires_faiss = requires("faiss", "search builds and queries its index with FAISS (faiss-cpu)")


@pytest.fixture(autouse=True)
def library_logs_as_the_library_leaves_them():
    """A script's `show_logs()` (a test that runs main()) makes the `moebert` logger its own: the next test starts from
    the library's defaults, its messages reaching pytest's caplog."""
    yield
    logger = logging.getLogger("moebert")
    logger.propagate, logger.level = True, logging.NOTSET
    for handler in [h for h in logger.handlers if h.get_name() == CONSOLE]:
        logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: each test starts without the one an earlier test left (its mixed
    precision would otherwise be refused by the next Accelerator that asks for another)."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def minilm():
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A randomly initialised 4-layer BERT (hidden 32) with the MiniLM tokenizer, saved as a local checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return str(folder)


TINY_SIZES = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}


@pytest.fixture(scope="session")
def tiny_mpnet(tmp_path_factory) -> str:
    """A randomly initialised 4-layer MPNet (hidden 32) with an MPNet tokenizer over the MiniLM vocabulary, laid out
    as MPNet's own (`<s>`, `<pad>`, `</s>`, `<unk>` first, `<mask>` last), saved as a local checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-mpnet")
    torch.manual_seed(0)
    words = (Path(minilm_path()) / "vocab.txt").read_text().splitlines()
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]
    MPNetModel(MPNetConfig(vocab_size=len(vocab), max_position_embeddings=130, **TINY_SIZES),
               add_pooling_layer=False).save_pretrained(folder)
    MPNetTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> str:
    """A randomly initialised 4-layer RoBERTa (hidden 32) with the MiniLM tokenizer, whose padding id (0) it takes
    as its own (RoBERTa's positions count from the padding id), saved as a local checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-roberta")
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=30522, max_position_embeddings=130, pad_token_id=0, **TINY_SIZES),
                 add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_moe(tiny_bert):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=DOMAINS)
    return model.eval(), tokenizer


TEXTS = [
    "Left ventricular ejection fraction predicts outcome after myocardial infarction.",
    "Airflow limitation in chronic obstructive pulmonary disease.",
    "Melanoma incidence rose steadily among young adults over two decades of follow-up.",
    "Malaria parasites evade the host immune response.",
    "Autoantibodies in systemic lupus erythematosus.",
]


def write_pairs(folder, rows=8):
    import pandas as pd

    frame = pd.DataFrame(
        {"a": [TEXTS[i % 5] + f" study {i}" for i in range(rows)],
         "b": [TEXTS[(i + 1) % 5] + f" follow-up {i}" for i in range(rows)],
         "label": [1, 0] * (rows // 2)}
    )
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        frame.to_csv(folder / f"{split}.csv", index=False)


@pytest.fixture
def tiny_data(tmp_path):
    """Two domains, CVD and COPD, of 8 pairs (4 co-cited) in every split."""
    for domain in ("CVD", "COPD"):
        write_pairs(tmp_path / "data" / domain)
    return tmp_path / "data"


class StepRecord(list):
    """Learning rates, one per optimizer step; with `stop_after` = k the process sends itself SIGTERM at step k."""

    stop_after = None


@pytest.fixture
def optimizer_steps(monkeypatch):
    """The learning rate of every optimizer step train.py takes in this process, in order."""
    from moebert.training import setup

    learning_rates = StepRecord()
    make_optimizer = setup.make_optimizer

    class CountedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            learning_rates.append(self.param_groups[0]["lr"])
            if len(learning_rates) == learning_rates.stop_after:  # as a scheduler's SIGTERM would, mid-run
                os.kill(os.getpid(), signal.SIGTERM)
            return super().step(closure)

    def counted(*args):
        optimizer = make_optimizer(*args)
        optimizer.__class__ = CountedAdamW
        return optimizer

    monkeypatch.setattr(setup, "make_optimizer", counted)
    return learning_rates


COUNTED_TRAIN = Path(__file__).with_name("counted_train.py")


def counted_steps(record: Path, rank: int = 0) -> list[float]:
    """The learning rates of the optimizer steps a `counted_train.py` process of this rank took."""
    path = record.with_name(f"{record.name}.{rank}")
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def workspace_of(output_dir: Path) -> Path:
    """Where train.py keeps checkpoints, the best model and stem states for OUTPUT_DIR (its default)."""
    return output_dir.with_name(f"{output_dir.name}-workspace")


def torch_encoder(spec, max_seq_length: int, batch_size: int = 8, **options):
    """The encoder eval.py and search.py would use for `spec` on the CPU, torch fp32 unless `options` say otherwise."""
    return load_encoder(str(spec), EncodingOptions(max_seq_length=max_seq_length, batch_size=batch_size, device="cpu",
                                                   **options))


HEART = ["heart", "cardiac", "ventricular", "infarction", "coronary", "arrhythmia", "myocardial", "atrial"]
LUNG = ["lung", "airway", "pulmonary", "bronchial", "asthma", "inhaler", "spirometry", "emphysema"]


def collection(n_per_domain: int, start: int = 0) -> pd.DataFrame:
    """Papers whose words say their domain, each text different."""
    rng = np.random.default_rng(start)
    rows = []
    for domain, words in (("CVD", HEART), ("COPD", LUNG)):
        for i in range(start, start + n_per_domain):
            text = " ".join(rng.choice(words, 6)) + f" study number {i} of {domain.lower()} patients"
            rows.append({"id": f"{domain}-{i}", "text": text, "domain": domain})
    return pd.DataFrame(rows)


@pytest.fixture
def moe_folder(tiny_bert, tmp_path):
    model, tokenizer = MoEBertModel.from_bert(tiny_bert, domains=["CVD", "COPD"])
    with torch.no_grad():  # two experts that really differ
        for parameter in model.encoder.layer[1].experts[1].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    return str(tmp_path / "moe")
