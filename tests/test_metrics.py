import numpy as np
import pytest

from sklearn.metrics import roc_auc_score

from moebert.metrics import (
    OneClassError,
    at_threshold,
    best_accuracy,
    f1_max,
    f1_max_value,
    honest_metrics,
    pair_metrics,
    paired_bootstrap,
    roc_auc,
)


def brute_force_f1_max(scores, labels):
    best = (0.0, None)
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = (predicted & (labels == 1)).sum()
        precision, recall = tp / predicted.sum(), tp / labels.sum()
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        if f1 > best[0]:
            best = (f1, threshold)
    return best


def test_f1_max_by_hand():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    labels = [1, 1, 0, 1, 0, 0]
    result = f1_max(scores, labels)
    # threshold 0.6: predicted 0.9, 0.8, 0.7, 0.6 -> tp 3, precision 3/4, recall 1, F1 6/7
    assert result["f1_max"] == pytest.approx(6 / 7)
    assert result["f1_max_threshold"] == 0.6
    assert (result["precision_at_f1_max"], result["recall_at_f1_max"]) == (0.75, 1.0)


def test_ties_are_cut_together():
    # a positive and a negative share 0.7: a threshold cannot separate them
    scores = [0.9, 0.7, 0.7, 0.2]
    labels = [1, 1, 0, 0]
    result = f1_max(scores, labels)
    assert result["f1_max"] == pytest.approx(0.8)  # at 0.7: tp 2 of 3 predicted; at 0.9: F1 2/3
    assert result["f1_max_threshold"] == 0.7
    assert best_accuracy(scores, labels)["accuracy_max"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_exact_search_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.5, 1.0), 1)  # rounding makes many ties
    expected_f1, expected_threshold = brute_force_f1_max(scores, labels)
    result = f1_max(scores, labels)
    assert result["f1_max"] == pytest.approx(expected_f1)
    assert result["f1_max_threshold"] == pytest.approx(expected_threshold)
    thresholds = np.concatenate([np.unique(scores), [np.inf]])
    accuracies = [((scores >= t) == labels).mean() for t in thresholds]
    assert best_accuracy(scores, labels)["accuracy_max"] == pytest.approx(max(accuracies))


def test_one_class_is_refused_with_a_message():
    with pytest.raises(OneClassError, match="all 3 pairs have label 1"):
        f1_max([0.1, 0.5, 0.9], [1, 1, 1])
    with pytest.raises(OneClassError):
        pair_metrics([0.1, 0.5], [0, 0])


def test_pair_metrics_by_hand():
    result = pair_metrics([0.9, 0.6, 0.3], [1, 0, 1])
    assert result["roc_auc"] == pytest.approx(0.5)  # positives 0.9 and 0.3 against the negative 0.6
    assert result["mean_cosine_positive"] == pytest.approx(0.6)
    assert result["mean_cosine_negative"] == pytest.approx(0.6)
    assert result["cosine_ratio"] == pytest.approx(1.0)
    assert result["average_precision"] == pytest.approx((1 + 2 / 3) / 2)


def test_honest_protocol_applies_the_valid_threshold_to_test():
    valid = ([0.9, 0.8, 0.3, 0.2], [1, 1, 0, 0])  # best threshold 0.8
    test = ([0.85, 0.75, 0.7, 0.1], [1, 1, 0, 0])  # the threshold of test itself would be 0.75
    result = honest_metrics(*valid, *test)
    assert result["valid_threshold"] == 0.8
    assert result["f1_at_valid_threshold"] == pytest.approx(2 / 3)  # only 0.85 called: precision 1, recall 1/2
    assert result["accuracy_at_valid_threshold"] == pytest.approx(0.75)
    assert f1_max(*test)["f1_max"] == 1.0
    assert at_threshold(*test, 0.75)["f1"] == 1.0


def tied_scores(seed, n=300):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return np.round(rng.normal(labels * 0.8, 1.0), 1), labels  # rounding makes many ties


@pytest.mark.parametrize("seed", range(5))
def test_fast_bootstrap_metrics_equal_the_reference_implementations(seed):
    scores, labels = tied_scores(seed)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert f1_max_value(scores, labels) == pytest.approx(f1_max(scores, labels)["f1_max"], abs=1e-12)
    assert f1_max_value(scores, labels) == pytest.approx(brute_force_f1_max(scores, labels)[0], abs=1e-12)


def two_domains(make_scores, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for domain, n in (("CVD", 200), ("COPD", 120)):
        labels = np.repeat([0, 1], n // 2)
        data[domain] = (make_scores(labels, rng), labels)
    return data


def test_bootstrap_interval_excludes_zero_when_one_model_is_clearly_better():
    better = two_domains(lambda y, rng: rng.normal(2.0 * y, 1.0))
    worse = two_domains(lambda y, rng: rng.normal(0.3 * y, 1.0), seed=1)
    gains = paired_bootstrap({"better": better, "worse": worse}, "worse", resamples=300)
    for view in ("mean", "all"):
        for metric in ("roc_auc", "f1_max"):
            gain = gains["better"][view][metric]
            assert 0 < gain["low"] < gain["gain"] < gain["high"]
    assert gains["worse"]["mean"]["roc_auc"] == {"gain": 0.0, "low": 0.0, "high": 0.0}


def test_bootstrap_interval_includes_zero_for_two_equally_good_models():
    one = two_domains(lambda y, rng: rng.normal(1.0 * y, 1.0), seed=2)
    other = two_domains(lambda y, rng: rng.normal(1.0 * y, 1.0), seed=3)
    gains = paired_bootstrap({"one": one, "other": other}, "other", resamples=300)
    for view in ("mean", "all"):
        for metric in ("roc_auc", "f1_max"):
            assert gains["one"][view][metric]["low"] < 0 < gains["one"][view][metric]["high"]


def test_bootstrap_is_paired_the_same_pairs_for_both_models():
    reference = two_domains(lambda y, rng: rng.normal(1.0 * y, 1.0), seed=4)
    shifted = {d: (2 * s + 5, y) for d, (s, y) in reference.items()}  # the same ranking on every resample
    gains = paired_bootstrap({"shifted": shifted, "reference": reference}, "reference", resamples=200)
    for metric in ("roc_auc", "f1_max"):
        assert gains["shifted"]["mean"][metric] == pytest.approx({"gain": 0.0, "low": 0.0, "high": 0.0}, abs=1e-12)
