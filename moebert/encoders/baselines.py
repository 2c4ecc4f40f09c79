"""The encoders MoE-BERT is compared with: a sentence-transformers model with its own pooling, and TF-IDF."""

import numpy as np

from moebert.encoders.interface import Encoder
from moebert.loading import refuse_remote_code


class SentenceTransformerEncoder(Encoder):
    """A sentence-transformers model (a repo with `modules.json`), encoded with its own pooling and normalisation:
    mean pooling would be wrong for models trained with CLS or last-token pooling."""

    def __init__(self, name_or_path: str, max_seq_length: int, batch_size: int, device: str = "cpu",
                 trust_remote_code=False):
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(name_or_path, trust_remote_code=trust_remote_code, device=device)
        except ValueError as error:
            refuse_remote_code(name_or_path, error)
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size

    def encode(self, texts: list[str], domain: str) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=True)


class TfidfEncoder(Encoder):
    """The classic reference: TF-IDF vectors fitted on the domain's training texts."""

    def __init__(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")

    def fit(self, train_texts: list[str]):
        self.vectorizer.fit(train_texts)

    def encode(self, texts: list[str], domain: str):
        return self.vectorizer.transform(texts)
