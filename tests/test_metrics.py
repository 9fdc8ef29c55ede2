"""The bundled accuracy and macro-F1 `evaluate` modules against naive per-example loops."""

import random

import pytest

from acx_ramanujan.training.metrics import load_metric


def naive_accuracy(predictions, references):
    hits = 0
    for predicted, actual in zip(predictions, references):
        hits += predicted == actual
    return hits / len(references)


def naive_macro_f1(predictions, references):
    """Precision and recall per class, F1 = 2PR/(P+R) (0 when P+R = 0), averaged over the classes that occur."""
    scores = []
    for label in sorted(set(predictions) | set(references)):
        tp = fp = fn = 0
        for predicted, actual in zip(predictions, references):
            tp += predicted == label and actual == label
            fp += predicted == label and actual != label
            fn += predicted != label and actual == label
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def accuracy():
    return load_metric("accuracy")


@pytest.fixture(scope="module")
def f1():
    return load_metric("f1")


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_naive_loops_on_random_labels(accuracy, f1, seed):
    rng = random.Random(seed)
    num_classes = rng.randint(2, 6)
    references = [rng.randrange(num_classes) for _ in range(rng.randint(5, 60))]
    # Mostly right, sometimes a class the references never use: exercises FP-only classes.
    predictions = [r if rng.random() < 0.6 else rng.randrange(num_classes + 1) for r in references]
    assert accuracy.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        naive_accuracy(predictions, references)
    )
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx(
        naive_macro_f1(predictions, references)
    )


def test_macro_f1_weights_classes_equally_not_examples(f1):
    # 9 of 10 examples are class 0 and all predicted 0: micro F1 would be 0.9, macro F1 is (18/19 + 0) / 2.
    references = [0] * 9 + [1]
    predictions = [0] * 10
    assert f1.compute(predictions=predictions, references=references)["f1"] == pytest.approx((18 / 19) / 2)


def test_perfect_predictions_score_one(accuracy, f1):
    labels = [2, 0, 1, 1, 2]
    assert accuracy.compute(predictions=labels, references=labels)["accuracy"] == 1.0
    assert f1.compute(predictions=labels, references=labels)["f1"] == 1.0


def test_batches_added_incrementally_equal_one_call(accuracy, f1):
    references, predictions = [0, 1, 2, 2, 1, 0], [0, 2, 2, 1, 1, 0]
    for metric in (accuracy, f1):
        metric.add_batch(predictions=predictions[:3], references=references[:3])
        metric.add_batch(predictions=predictions[3:], references=references[3:])
        assert metric.compute() == metric.compute(predictions=predictions, references=references)
