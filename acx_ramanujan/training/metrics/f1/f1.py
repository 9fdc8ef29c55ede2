"""Macro F1 as a local `evaluate` module.

Per class c: F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c) (the harmonic mean of precision and recall, written so
it is defined whenever c occurs at all); macro F1 is the unweighted mean over the classes that occur in the
references or the predictions, the class set scikit-learn's `f1_score(average="macro")` uses.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Macro F1: the unweighted mean of per-class F1 = 2TP / (2TP + FP + FN)."


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description="predictions, references: integer class ids, one per example.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        scores = []
        for label in np.union1d(predictions, references):
            predicted, actual = predictions == label, references == label
            true_positives = np.sum(predicted & actual)
            scores.append(2 * true_positives / (2 * true_positives + np.sum(predicted & ~actual) + np.sum(~predicted & actual)))
        return {"f1": float(np.mean(scores))}
