import numpy as np
import pytest

from sklearn.metrics import roc_auc_score

from moebert.evaluation.metrics import (
    OneClassError,
    _stratified_draw,
    at_threshold,
    best_accuracy,
    f1_max,
    f1_max_value,
    honest_metrics,
    metric_summary,
    pair_metrics,
    paired_bootstrap,
    ranking_metrics,
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
    with pytest.raises(OneClassError, match=r"all 3 pairs have label 1: threshold metrics need both co-cited \(1\) and "
                                            r"random \(0\) pairs\.$"):
        f1_max([0.1, 0.5, 0.9], [1, 1, 1])
    with pytest.raises(OneClassError):
        pair_metrics([0.1, 0.5], [0, 0])
    with pytest.raises(OneClassError, match="all 0 pairs have label -"):
        f1_max([], [])


def test_malformed_pairs_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"scores \(3,\) and labels \(2,\) must be two 1-d arrays of one length"):
        f1_max([0.1, 0.5, 0.9], [1, 0])
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, found \[0, 2\]"):
        f1_max([0.1, 0.5], [0, 2])


def test_f1_max_below_one_half():
    # three random pairs above the first co-cited one: the best cut calls four pairs (precision 1/4, recall 1/2)
    labels = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    scores = np.linspace(1.0, 0.0, len(labels))
    assert f1_max(scores, labels)["f1_max"] == pytest.approx(1 / 3)


def test_pair_metrics_by_hand():
    unequal = pair_metrics([0.9, 0.7, 0.2, 0.1], [1, 1, 0, 0])
    assert (unequal["mean_cosine_positive"], unequal["mean_cosine_negative"]) == pytest.approx((0.8, 0.15))
    assert set(unequal) >= {"accuracy_max", "accuracy_max_threshold", "f1_max_threshold"}
    assert pair_metrics([0.9, 0.5, 0.2, -0.2], [1, 1, 0, 0])["cosine_ratio"] == float("inf")  # negatives average 0
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


def test_bootstrap_gives_each_domain_its_own_interval():
    # a model better on CVD only, the same ranking as the reference on COPD: the mean gains, COPD's gain is exactly 0
    reference = two_domains(lambda y, rng: rng.normal(0.5 * y, 1.0), seed=7)
    sharper = dict(reference, CVD=(reference["CVD"][0] + 2.0 * reference["CVD"][1], reference["CVD"][1]))
    gains = paired_bootstrap({"sharper": sharper, "reference": reference}, "reference", resamples=300, seed=1)
    cvd = gains["sharper"]["CVD"]["roc_auc"]
    assert 0 < cvd["low"] < cvd["gain"] < cvd["high"]
    assert gains["sharper"]["COPD"]["roc_auc"] == {"gain": 0.0, "low": 0.0, "high": 0.0}
    assert gains["sharper"]["mean"]["roc_auc"]["gain"] == pytest.approx(cvd["gain"] / 2)
    # each domain's interval is the percentile interval of that domain's paired differences
    labels = {d: y for d, (_, y) in reference.items()}
    rng = np.random.default_rng(1)
    differences = []
    for _ in range(300):
        draw = _stratified_draw(labels, rng)["CVD"]
        y = labels["CVD"][draw]
        differences.append(roc_auc(sharper["CVD"][0][draw], y) - roc_auc(reference["CVD"][0][draw], y))
    assert [cvd["low"], cvd["high"]] == pytest.approx(np.percentile(differences, [2.5, 97.5]).tolist(), abs=1e-12)


def test_at_threshold_by_hand_and_when_nothing_is_called_co_cited():
    scores, labels = [0.9, 0.8, 0.7, 0.2], [1, 0, 1, 0]
    # >= 0.75: 0.9 and 0.8 called, tp 1: precision 1/2, recall 1/2, F1 1/2, accuracy 2/4
    assert at_threshold(scores, labels, 0.75) == pytest.approx(
        {"f1": 0.5, "precision": 0.5, "recall": 0.5, "accuracy": 0.5})
    # above every score nothing is called: precision, recall and F1 are 0, accuracy the share of random pairs
    assert at_threshold(scores, labels, 0.95) == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "accuracy": 0.5}


def test_f1_max_value_counts_the_cut_below_every_score():
    # the best F1 calls every pair co-cited: tp 1 of 2 called, recall 1, F1 2/3
    assert f1_max_value([0.9, 0.1], [0, 1]) == pytest.approx(2 / 3)


def test_stratified_draws_keep_each_domains_label_counts_and_reach_every_pair():
    labels = {"CVD": np.array([0, 0, 0, 0, 0, 1, 1]), "COPD": np.array([1, 0, 1, 1])}
    rng = np.random.default_rng(0)
    seen = {d: set() for d in labels}
    for _ in range(200):
        draw = _stratified_draw(labels, rng)
        for domain, y in labels.items():
            assert np.bincount(y[draw[domain]], minlength=2).tolist() == np.bincount(y).tolist()
            seen[domain] |= set(draw[domain].tolist())
    assert seen == {d: set(range(len(y))) for d, y in labels.items()}


def test_bootstrap_gives_the_95_percent_interval_of_the_paired_differences_and_repeats_itself():
    one = two_domains(lambda y, rng: rng.normal(1.0 * y, 1.0), seed=5)
    other = two_domains(lambda y, rng: rng.normal(0.8 * y, 1.0), seed=6)
    gains = paired_bootstrap({"one": one, "other": other}, "other", resamples=400, seed=3)
    labels = {d: y for d, (_, y) in one.items()}
    rng = np.random.default_rng(3)
    differences = []
    for _ in range(400):
        draw = _stratified_draw(labels, rng)
        differences.append(np.mean([roc_auc(one[d][0][draw[d]], y[draw[d]]) - roc_auc(other[d][0][draw[d]], y[draw[d]])
                                    for d, y in labels.items()]))
    low, high = np.percentile(differences, [2.5, 97.5])
    assert gains["one"]["mean"]["roc_auc"]["low"] == pytest.approx(low, abs=1e-12)
    assert gains["one"]["mean"]["roc_auc"]["high"] == pytest.approx(high, abs=1e-12)
    assert paired_bootstrap({"one": one, "other": other}, "other", resamples=400, seed=3) == gains


def test_ranking_metrics_by_hand():
    similarity = np.array([
        [1.0, 0.9, 0.8, 0.1],  # query 0: ranks 1, 2, 3 (itself left out); partner 2 at rank 2
        [0.9, 1.0, 0.2, 0.7],  # query 1: ranks 0, 3, 2; partners 2 and 3 at ranks 3 and 2
        [0.8, 0.2, 1.0, 0.3],
        [0.1, 0.7, 0.3, 1.0],
    ])
    result = ranking_metrics(similarity, {0: {2}, 1: {2, 3}}, recall_ks=(1, 2))
    assert result["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert result["recall_at_1"] == 0.0
    assert result["recall_at_2"] == pytest.approx((1 + 1 / 2) / 2)
    ndcg_0 = (1 / np.log2(3)) / 1
    ndcg_1 = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert result["ndcg_at_10"] == pytest.approx((ndcg_0 + ndcg_1) / 2)
    assert ranking_metrics(similarity, {0: {0}})["mrr"] == 0.0  # no partner but itself: nothing to find
    many = np.tile(np.linspace(1.0, 0.0, 14), (14, 1))  # query 0's twelve partners ranked first
    assert ranking_metrics(many, {0: set(range(1, 13))})["ndcg_at_10"] == pytest.approx(1.0)
    hidden = similarity.copy()
    hidden[0, 1] = -np.inf  # a candidate the query must not see drops to the end
    assert ranking_metrics(hidden, {0: {2}})["mrr"] == 1.0


def test_metric_summary_names_the_mean_and_the_pooled_headline_metrics():
    results = {"mean": {"f1_max": 0.8, "roc_auc": 0.85, "mrr": 0.5}, "all": {"roc_auc": 0.77}, "CVD": {"roc_auc": 0.9}}
    assert metric_summary(results) == {"f1_max": 0.8, "roc_auc": 0.85, "pooled_roc_auc": 0.77}
    assert metric_summary({"mean": {"roc_auc": 0.85}}) == {"roc_auc": 0.85}  # no pooled results
