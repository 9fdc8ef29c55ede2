"""Perplexity and bits per byte from summed negative log-likelihoods (an `evaluate` module, loaded by local path).

Each batch contributes its summed NLL in nats (`predictions`) and the number of tokens it predicted
(`references`), so the result is the token-weighted mean over the whole evaluation set, not a mean of batch means.

- loss = Σ NLL / Σ tokens; perplexity = exp(loss).
- bits per byte = Σ NLL / (ln 2 · bytes), the tokenizer-independent measure of the Pile paper
  (Gao et al. 2020, §4.1): the same text costs the same bits whatever the vocabulary.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted loss and perplexity, and bits per byte of the evaluated UTF-8 text."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): summed negative log-likelihood (nats) of each batch.
    references (list of int): number of predicted tokens in each batch.
    num_bytes (int or float, optional): UTF-8 bytes of the evaluated text; adds `bits_per_byte`.
Returns:
    loss (float): mean NLL per token (nats); perplexity (float): exp(loss);
    bits_per_byte (float, only with num_bytes): total NLL / (ln 2 * num_bytes).
Example:
    >>> metric = load_metric("perplexity")
    >>> metric.compute(predictions=[2.0, 4.0], references=[1, 3], num_bytes=4)["loss"]
    1.5
"""
_CITATION = """@article{gao2020pile, title={The Pile: An 800GB Dataset of Diverse Text for Language Modeling},
author={Gao, Leo and others}, journal={arXiv preprint arXiv:2101.00027}, year={2020}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_bytes=None):
        total_nll, total_tokens = math.fsum(predictions), sum(references)
        if total_tokens <= 0:
            raise ValueError("perplexity needs at least one predicted token")
        loss = total_nll / total_tokens
        result = {"loss": loss, "perplexity": math.exp(loss)}
        if num_bytes is not None:
            if num_bytes <= 0:
                raise ValueError(f"num_bytes must be positive, got {num_bytes}")
            result["bits_per_byte"] = total_nll / (math.log(2) * num_bytes)
        return result
