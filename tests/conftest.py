import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoTokenizer, BertConfig, BertModel  # noqa: E402

from defaults import default_base_model as minilm_path  # noqa: E402
from modeling_moebert import MoEBertModel  # noqa: E402

DOMAINS = ["CVD", "COPD", "SKIN", "PARA", "AUTO"]


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
