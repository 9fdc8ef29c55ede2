"""acx-ramanujan-transformer: Transformers-native decoders with the Ramanujan-recurrence initialization.

Importing the package registers its config, models and tokenizer with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .configuration_ramanujan import RamanujanConfig
from .initialization_ramanujan import INIT_SCHEMES, ramanujan_coefficients, ramanujan_layer_scales
from .modeling_ramanujan import (
    RamanujanForCausalLM,
    RamanujanForSequenceClassification,
    RamanujanModel,
    RamanujanPreTrainedModel,
)
from .training.bpe import train_bpe_tokenizer
from .tokenization_ramanujan import RamanujanByteTokenizer

__version__ = "0.1.0"

AutoConfig.register("ramanujan", RamanujanConfig, exist_ok=True)
AutoModel.register(RamanujanConfig, RamanujanModel, exist_ok=True)
AutoModelForCausalLM.register(RamanujanConfig, RamanujanForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(RamanujanConfig, RamanujanForSequenceClassification, exist_ok=True)
AutoTokenizer.register(RamanujanConfig, tokenizer_class=RamanujanByteTokenizer, exist_ok=True)

# save_pretrained writes `auto_map` and copies the code files, so checkpoints load with trust_remote_code=True
# where this package is not installed.
RamanujanConfig.register_for_auto_class()
RamanujanModel.register_for_auto_class("AutoModel")
RamanujanForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RamanujanForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
RamanujanByteTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = [
    "INIT_SCHEMES",
    "RamanujanByteTokenizer",
    "RamanujanConfig",
    "RamanujanForCausalLM",
    "RamanujanForSequenceClassification",
    "RamanujanModel",
    "RamanujanPreTrainedModel",
    "ramanujan_coefficients",
    "ramanujan_layer_scales",
    "train_bpe_tokenizer",
]
