"""Sequence classification fine-tuning: a separable task, saved labels, LoRA on MoE with merge, bad input."""

import csv
import json
import random

import pytest
import torch
from conftest import tiny_config, tiny_moe_config
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from acx_ramanujan import RamanujanForCausalLM
from acx_ramanujan.classification import main
from acx_ramanujan.tokenization_ramanujan import RamanujanByteTokenizer

QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--logging_steps", "1"]
LETTERS = {"neg": "abcdefghijklm", "pos": "nopqrstuvwxyz", "mid": "0123456789"}


def save_checkpoint(directory, config):
    torch.manual_seed(0)
    RamanujanForCausalLM(config).save_pretrained(directory)
    RamanujanByteTokenizer().save_pretrained(directory)
    return str(directory)


def write_csv(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def separable_rows(labels, count, seed):
    """Each label owns a disjoint alphabet: any text tells its class from any one character."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = rng.choice(labels)
        alphabet = LETTERS[label] if label in LETTERS else LETTERS[list(LETTERS)[label]]
        rows.append(("".join(rng.choice(alphabet) for _ in range(rng.randint(4, 12))), label))
    return rows


def classify(*arguments) -> int:
    return main([*map(str, arguments), *QUIET])


def read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config())


def test_separable_task_reaches_high_accuracy_and_saves_its_labels(dense_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 96, seed=0))
    validation_rows = separable_rows(["neg", "pos"], 32, seed=1)
    validation = write_csv(tmp_path / "validation.csv", validation_rows)
    output = tmp_path / "out"
    assert classify(
        "--model_name_or_path", dense_checkpoint, "--train_file", train, "--validation_file", validation,
        "--max_steps", 12, "--learning_rate", 1e-2, "--per_device_train_batch_size", 16,
        "--per_device_eval_batch_size", 32, "--save_strategy", "no", "--output_dir", output,
    ) == 0
    results = read_json(output / "eval_results.json")
    assert results["eval_accuracy"] >= 0.9

    # The saved classifier, evaluated by hand, gives the accuracy the Trainer reported.
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    tokenizer = RamanujanByteTokenizer.from_pretrained(output)
    batch = tokenizer([text for text, _ in validation_rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    hits = [model.config.id2label[p] == label for p, (_, label) in zip(predicted, validation_rows)]
    assert results["eval_accuracy"] == pytest.approx(sum(hits) / len(hits))


def test_moe_lora_with_integer_labels_merges_exactly(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "moe", tiny_moe_config())
    rows = separable_rows([0, 1, 2], 48, seed=2)
    train = write_csv(tmp_path / "train.csv", rows[:36])
    validation = write_csv(tmp_path / "validation.csv", rows[36:])
    output = tmp_path / "out"
    assert classify(
        "--model_name_or_path", checkpoint, "--train_file", train, "--validation_file", validation,
        "--max_steps", 3, "--learning_rate", 1e-2, "--per_device_train_batch_size", 12, "--use_lora",
        "--lora_r", 4, "--merge_lora", "--save_strategy", "no", "--output_dir", output,
    ) == 0
    results = read_json(output / "eval_results.json")
    assert 0 <= results["eval_f1"] <= 1 and 0 <= results["eval_accuracy"] <= 1
    logs = [entry for entry in read_json(output / "trainer_state.json")["log_history"] if "loss" in entry]
    assert all("expert_load_max" in entry for entry in logs)

    merged = AutoModelForSequenceClassification.from_pretrained(output / "merged").eval()
    assert merged.config.id2label == {0: "0", 1: "1", 2: "2"}
    base = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=3, id2label=merged.config.id2label, label2id=merged.config.label2id
    )
    adapted = PeftModel.from_pretrained(base, output).eval()  # the trained score head comes with the adapter
    input_ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted(input_ids).logits, atol=1e-5, rtol=1e-5)


def assert_rejected(capsys, output, *arguments, message):
    assert classify(*arguments, "--output_dir", output, "--max_steps", 1) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: datasets' progress bars
    assert error.startswith("finetune_classification: error: ") and message in error, error
    assert not output.exists()


def test_validation_label_unseen_in_training_is_rejected(capsys, dense_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 20, seed=0))
    validation = write_csv(tmp_path / "validation.csv", separable_rows(["neg", "mid"], 20, seed=1))
    assert_rejected(
        capsys, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", train,
        "--validation_file", validation, message="label(s) the training data lacks: 'mid'",
    )


def test_missing_label_column_names_the_columns_that_exist(capsys, dense_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 20, seed=0))
    assert_rejected(
        capsys, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", train,
        "--label_column", "sentiment", message="no column 'sentiment' (columns: text, label)",
    )


def test_text_column_with_nulls_is_rejected(capsys, dense_checkpoint, tmp_path):
    rows = [{"text": None if i == 5 else f"text {i}", "label": i % 2} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_rejected(
        capsys, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", train,
        message="null value(s) in column 'text'",
    )


def test_checkpoint_without_a_classification_model_is_rejected(capsys, tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 20, seed=0))
    assert_rejected(
        capsys, tmp_path / "out", "--model_name_or_path", tmp_path / "vit", "--train_file", train,
        message="is a 'vit' checkpoint, which has no sequence-classification model",
    )
