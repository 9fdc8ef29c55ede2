"""Transformers' own common model tests, run against our dense and MoE models.

A model inside Transformers must pass `ModelTesterMixin` (tests/test_modeling_common.py) and `ConfigTester`
(tests/test_configuration_common.py); our test classes plug into them the way Llama's and Qwen3-MoE's test
modules do. The mixins are not copied into this repository: `load_upstream()` fetches the sdist of the
INSTALLED Transformers release from the package registry (`pip download --no-binary :all:`), caches its tests/
folder outside the repository and imports it as the package `transformers_upstream_tests`, so every supported
release is checked against its own tests.

The sdist ships the top-level mixin modules but not three modules they import. How each is provided:
- `generation.test_utils.GenerationTesterMixin`: our own generation tests (tests/test_generation.py) — the
  same behaviours (cached = uncached, beam, assisted, static cache, continuing a cache...), which our test
  classes inherit exactly as upstream's model tests inherit the upstream mixin.
- `exporters.test_export.ExportTesterMixin` (ModelTesterMixin's base class): `ExportTesterMixin` below, our own
  `torch.export` check (upstream's module, which drives Transformers' exporters, is only in the repository).
- `utils.test_configuration_utils.config_common_kwargs`: `CONFIG_COMMON_KWARGS` below, our own non-default
  value for each common `PreTrainedConfig` argument, read by `ConfigTester.check_config_arguments_init`.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import torch
import transformers
from filelock import FileLock
from transformers.models.auto import modeling_auto
from test_generation import GenerationTesterMixin

from acx_ramanujan import RamanujanConfig, RamanujanForCausalLM, RamanujanForSequenceClassification, RamanujanModel
from acx_ramanujan.modeling_ramanujan import RamanujanRotaryEmbedding

PACKAGE = "transformers_upstream_tests"
CACHE_ROOT = Path(os.environ.get("ACX_TRANSFORMERS_TESTS_CACHE", Path.home() / ".cache/acx-ramanujan/transformers-tests"))

# Tests of the mixins that cannot apply to our models, by test class and name, with the reason. Nothing else is skipped
# or deselected (what the mixins skip themselves: no GPU, flash-attn, DeepSpeed or kernels here; @slow tests; features
# we do not have, such as sliding windows or composite configs).
SKIPPED = {
    ("RamanujanDenseModelTest", "test_eager_matches_batched_and_grouped_inference"): (
        "decides that a class has sparse experts from its module's source (`_can_set_experts_implementation`); one "
        "class serves dense and MoE configs, and a dense config calls no experts function. Runs for the MoE class."
    ),
}


def upstream_tests_dir(version: str = transformers.__version__) -> Path:
    """The sdist's tests/ folder for `version`, downloaded once into CACHE_ROOT/<version> (atomic, locked)."""
    target = CACHE_ROOT / version / "tests"
    if (target / "test_modeling_common.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / ".lock")):
        if (target / "test_modeling_common.py").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            download = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                 f"transformers=={version}", "-d", scratch],
                capture_output=True, text=True,
            )
            if download.returncode != 0:
                raise RuntimeError(f"could not download the transformers=={version} sdist: {download.stderr[-2000:]}")
            (sdist,) = Path(scratch).glob("transformers-*.tar.gz")
            prefix = f"{sdist.name[: -len('.tar.gz')]}/tests/"
            extracted = Path(scratch) / "tests"
            extracted.mkdir()
            (extracted / "__init__.py").touch()  # a package, for the modules' relative imports
            with tarfile.open(sdist) as archive:
                for member in archive.getmembers():
                    name = member.name[len(prefix):] if member.name.startswith(prefix) else ""
                    if member.isfile() and name.endswith(".py") and "/" not in name:
                        (extracted / name).write_bytes(archive.extractfile(member).read())
            shutil.rmtree(target, ignore_errors=True)
            os.replace(extracted, target)
    return target


# Our value for each argument `PreTrainedConfig` takes in common (none of them its default), playing the role of
# upstream's tests/utils/test_configuration_utils.config_common_kwargs, which the sdist lacks.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["RamanujanForCausalLM"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "tie_word_embeddings": True,
    "is_decoder": True,
    "add_cross_attention": True,
    "cross_attention_hidden_size": 128,
    "tokenizer_class": "RamanujanByteTokenizer",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "task_specific_params": {"translation": "some_params"},
    "finetuning_task": "translation",
    "prefix": "prefix",
}


class ExportTesterMixin:
    """Our stand-in for upstream's export tests: `torch.export` of every model class reproduces eager outputs."""

    def test_torch_export_matches_eager(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {**inputs, "use_cache": False}
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(config).eval()
                with torch.no_grad():
                    expected = model(**inputs)[0]
                    exported = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                    got = exported.module()(**inputs)[0]
                torch.testing.assert_close(got, expected)


def _package(name: str, folder: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def load_upstream() -> tuple[types.ModuleType, types.ModuleType]:
    """Import the installed release's test_modeling_common and test_configuration_common (see the module doc)."""
    _package(PACKAGE, upstream_tests_dir())
    _module(f"{PACKAGE}.generation")
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    _module(f"{PACKAGE}.exporters")
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=ExportTesterMixin)
    _module(f"{PACKAGE}.utils")
    _module(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs=CONFIG_COMMON_KWARGS)
    return (importlib.import_module(f"{PACKAGE}.test_modeling_common"),
            importlib.import_module(f"{PACKAGE}.test_configuration_common"))


modeling_common, configuration_common = load_upstream()


MODEL_MAPPINGS = (
    (modeling_auto.MODEL_MAPPING_NAMES, "RamanujanModel"),
    (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "RamanujanForCausalLM"),
    (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "RamanujanForSequenceClassification"),
)


class RamanujanModelTester:
    """Builds the tiny config and inputs, in the shape of upstream's CausalLMModelTester."""

    base_model_class = RamanujanModel
    causal_lm_class = RamanujanForCausalLM
    sequence_classification_class = RamanujanForSequenceClassification
    config_class = RamanujanConfig

    def __init__(self, parent, batch_size=13, seq_length=7, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, num_experts=0,
                 num_experts_per_tok=2, moe_intermediate_size=12, num_labels=3, is_training=True):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.intermediate_size, self.num_labels, self.is_training = intermediate_size, num_labels, is_training
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size

    def get_config(self):
        return RamanujanConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size, num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = modeling_common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.tril(torch.ones_like(input_ids))
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class RamanujanCommonTests(modeling_common.ModelTesterMixin, GenerationTesterMixin):
    """The mixins plus what upstream's CausalLMModelTest adds (config tests, a forward, classification heads)."""

    all_model_classes = (RamanujanModel, RamanujanForCausalLM, RamanujanForSequenceClassification)
    rotary_embedding_layer = RamanujanRotaryEmbedding
    # test_can_init_all_missing_weights dates a model by its config file's copyright line and runs only for models
    # added from 2023 on, or with this flag: ours has no such line, and the test checks _init_weights covers every
    # weight.
    test_can_init_all_missing_weights_before_2023 = True
    tester_arguments: dict = {}

    def setUp(self):
        for (test_class, name), reason in SKIPPED.items():
            test_name = self._testMethodName
            if type(self).__name__ == test_class and (test_name == name or test_name.startswith(name + "_")):
                self.skipTest(reason)
        # Upstream decides label shapes and which tests apply by looking a class's name up in Transformers' model
        # mappings; list ours there for the test, as a model inside the library is.
        for mapping, class_name in MODEL_MAPPINGS:
            patcher = mock.patch.dict(mapping, {"ramanujan": class_name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = RamanujanModelTester(self, **self.tester_arguments)
        self.config_tester = configuration_common.ConfigTester(
            # Llama's and Qwen3-MoE's testers pass hidden_size=37; with our 4 heads that is an odd head_dim, which
            # rotary embeddings cannot use (the config refuses it): a non-default size they can.
            self, config_class=RamanujanConfig, hidden_size=40, **self.tester_arguments
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = RamanujanModel(config).eval()
        result = model(**inputs)
        self.assertEqual(
            result.last_hidden_state.shape,
            (self.model_tester.batch_size, self.model_tester.seq_length, self.model_tester.hidden_size),
        )

    def test_sequence_classification_model(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for problem_type, labels in (
            ("single_label_classification", modeling_common.ids_tensor([self.model_tester.batch_size], 3)),
            ("multi_label_classification",
             modeling_common.ids_tensor([self.model_tester.batch_size, 3], 2).to(torch.float)),
        ):
            config.problem_type = problem_type
            model = RamanujanForSequenceClassification(config).eval()
            result = model(**inputs, labels=labels)
            self.assertEqual(result.logits.shape, (self.model_tester.batch_size, 3))
            self.assertTrue(torch.isfinite(result.loss))


class RamanujanDenseModelTest(RamanujanCommonTests, unittest.TestCase):
    tester_arguments = {}


class RamanujanMoeModelTest(RamanujanCommonTests, unittest.TestCase):
    # moe_intermediate_size 16, not upstream's default 12: torch's CPU grouped_mm needs 16-byte strides, and with 12
    # Qwen3-MoE fails test_eager_matches_batched_and_grouped_inference in fp16/bf16 on CPU just as ours does.
    tester_arguments = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
