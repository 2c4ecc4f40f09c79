"""Predicting a query's domain: TF-IDF words and a logistic regression fitted on a collection's own labels, stored
as JSON and .npy arrays (no pickle), so an index from elsewhere can be loaded safely."""

import json
from pathlib import Path

import numpy as np


class DomainClassifier:
    """Predicts a query's domain: TF-IDF words and a logistic regression fitted on the collection's own labels.
    Stored as JSON and .npy arrays (no pickle), so an index from elsewhere can be loaded safely."""

    def __init__(self, vocabulary: dict, idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray, classes: list):
        self.vocabulary, self.idf, self.coef, self.intercept, self.classes = vocabulary, idf, coef, intercept, classes

    @classmethod
    def fit(cls, texts: list[str], domains: list[str]) -> "DomainClassifier":
        from sklearn.linear_model import LogisticRegression

        vectorizer = domain_vectorizer()
        features = vectorizer.fit_transform(texts)
        if len(set(domains)) == 1:  # nothing to tell apart
            coef, intercept = np.zeros((1, features.shape[1])), np.zeros(1)
        else:
            regression = LogisticRegression(max_iter=1000, C=10.0).fit(features, domains)
            coef, intercept = regression.coef_, regression.intercept_
            if len(regression.classes_) == 2:  # sklearn keeps one row z for two classes: p = sigmoid(z) = softmax(0, z)
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        vocabulary = {word: int(i) for word, i in vectorizer.vocabulary_.items()}
        return cls(vocabulary, vectorizer.idf_, coef, intercept, sorted(set(domains)))

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(domain, probability) per text."""
        vectorizer = domain_vectorizer()
        vectorizer.vocabulary_, vectorizer.idf_ = self.vocabulary, self.idf
        scores = vectorizer.transform(texts) @ self.coef.T + self.intercept
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        probabilities = scores / scores.sum(axis=1, keepdims=True)
        best = probabilities.argmax(axis=1)
        return [self.classes[i] for i in best], probabilities[np.arange(len(texts)), best]

    def save(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "domain_classifier.json").write_text(json.dumps({"vocabulary": self.vocabulary, "classes": self.classes}))
        for name in ("idf", "coef", "intercept"):
            np.save(folder / f"domain_classifier_{name}.npy", getattr(self, name), allow_pickle=False)

    @classmethod
    def load(cls, folder: Path) -> "DomainClassifier":
        meta = json.loads((folder / "domain_classifier.json").read_text())
        arrays = [np.load(folder / f"domain_classifier_{n}.npy", allow_pickle=False) for n in ("idf", "coef", "intercept")]
        return cls(meta["vocabulary"], *arrays, meta["classes"])


def domain_vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=1)


def held_out_accuracy(texts: list[str], domains: list[str], seed: int = 0) -> float | None:
    """Accuracy of the classifier on a random fifth of the papers, fitted on the rest."""
    if len(set(domains)) < 2 or len(texts) < 10:
        return None
    held_out = np.random.default_rng(seed).random(len(texts)) < 0.2
    fitted = DomainClassifier.fit([t for t, h in zip(texts, held_out) if not h], [d for d, h in zip(domains, held_out) if not h])
    predicted, _ = fitted.predict([t for t, h in zip(texts, held_out) if h])
    return float(np.mean([p == d for p, d in zip(predicted, (d for d, h in zip(domains, held_out) if h))]))
