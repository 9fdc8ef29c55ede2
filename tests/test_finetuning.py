"""Trainer fine-tuning: causal LM (`acx-rt finetune`) and sequence classification.

Tiny runs (dense and MoE), prompt masking, LoRA save/load/merge, resume, MoE losses, and each bad input.
"""

import csv
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_moe_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, ViTConfig

from acx_ramanujan import RamanujanForCausalLM
from acx_ramanujan.training import classification
from acx_ramanujan.training.causal_lm import DataArguments, build_trainer, encode_chat, encode_prompt_response, main
from acx_ramanujan.training.finetune import parse_arguments
from acx_ramanujan.training.lora import LoraArguments, lora_config
from acx_ramanujan.modeling_ramanujan import router_z_loss, switch_balance_loss
from acx_ramanujan.tokenization_ramanujan import RamanujanByteTokenizer
from acx_ramanujan.cards import hardware_description

BOS, EOS = 257, 258
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", "--logging_steps", "1"]


def save_checkpoint(directory, config):
    torch.manual_seed(0)
    RamanujanForCausalLM(config).save_pretrained(directory)
    RamanujanByteTokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("dense"), tiny_config())


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("moe"), tiny_moe_config())


@pytest.fixture(scope="module")
def prompt_response_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"question": f"What is {i} plus one?", "answer": f"{i + 1}."} for i in range(24)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def finetune(*arguments) -> int:
    return main([*map(str, arguments), *QUIET])


def classify(*arguments) -> int:
    return classification.main([*map(str, arguments), *QUIET])


def read_json(path):
    return json.loads(path.read_text())


# --- data encoding --------------------------------------------------------------------------------------------------


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_prompt_response_masks_the_prompt_and_learns_response_and_eos():
    encoded = encode_prompt_response(RamanujanByteTokenizer(), "Hi?", "Yo", max_length=64)
    assert encoded["input_ids"] == [BOS, *byte_ids("Hi?"), *byte_ids("Yo"), EOS]
    assert encoded["labels"] == [-100, -100, -100, -100, *byte_ids("Yo"), EOS]
    truncated = encode_prompt_response(RamanujanByteTokenizer(), "Hi?", "Yo", max_length=5)
    assert truncated["input_ids"] == [BOS, *byte_ids("Hi?"), byte_ids("Y")[0]]
    assert truncated["labels"] == [-100] * 4 + byte_ids("Y")


def test_chat_learns_only_assistant_turns():
    # The byte tokenizer's template renders each turn as <s>{role}\n{content}</s>.
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    encoded = encode_chat(RamanujanByteTokenizer(), messages, max_length=256)

    def turn(role, content):
        return [BOS, *byte_ids(f"{role}\n{content}"), EOS]

    prompt_1 = turn("system", "Be brief.") + turn("user", "Hi") + [BOS, *byte_ids("assistant\n")]
    answer_1 = [*byte_ids("Yo"), EOS]
    prompt_2 = turn("user", "Bye") + [BOS, *byte_ids("assistant\n")]
    answer_2 = [*byte_ids("Ciao"), EOS]
    assert encoded["input_ids"] == prompt_1 + answer_1 + prompt_2 + answer_2
    assert encoded["labels"] == [-100] * len(prompt_1) + answer_1 + [-100] * len(prompt_2) + answer_2


def test_chat_without_a_prompt_before_the_assistant_is_rejected():
    with pytest.raises(ValueError, match="starts with an assistant message"):
        encode_chat(RamanujanByteTokenizer(), [{"role": "assistant", "content": "Yo"}], max_length=64)


# --- tiny Trainer runs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_packed_text_run_writes_model_metrics_and_card(kind, request, text_corpus, tmp_path):
    checkpoint = request.getfixturevalue(f"{kind}_checkpoint")
    text = tmp_path / "corpus.txt"
    text.write_text(text_corpus.read_text()[:6000])
    output = tmp_path / "out"
    assert finetune(
        "--model_name_or_path", checkpoint, "--train_file", text, "--validation_split_percentage", 10,
        "--block_size", 32, "--max_steps", 3, "--per_device_train_batch_size", 4,
        "--per_device_eval_batch_size", 64, "--save_strategy", "no", "--output_dir", output,
    ) == 0
    results = read_json(output / "eval_results.json")
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_lm_loss"]))
    if kind == "dense":
        # One evaluation batch of equal-length blocks: Trainer's loss and our NLL-from-logits are the same mean.
        assert results["eval_loss"] == pytest.approx(results["eval_lm_loss"], rel=1e-5)
    else:
        # eval_loss is the training objective: it includes the router losses, which are positive.
        assert results["eval_loss"] > results["eval_lm_loss"]
        logs = [entry for entry in read_json(output / "trainer_state.json")["log_history"] if "loss" in entry]
        assert len(logs) == 3 and all("expert_load_min" in entry and "expert_load_max" in entry for entry in logs)
    reloaded = RamanujanForCausalLM.from_pretrained(output)
    assert not torch.equal(reloaded.lm_head.weight, RamanujanForCausalLM.from_pretrained(checkpoint).lm_head.weight)
    card = (output / "README.md").read_text()
    assert f"{results['eval_perplexity']:.4g}" in card  # the measured number, not just the word
    assert hardware_description(torch.device("cpu"), 1) in card  # the same wording as a pretraining card


def test_expert_load_meter_averages_training_forwards_like_a_naive_count():
    """Logged expert load = per layer, the share of top-k assignments per expert, averaged over training forwards
    since the last read (counted here token by token); evaluation forwards are left out."""
    from acx_ramanujan.training.finetune import ExpertLoadMeter

    torch.manual_seed(0)
    model = RamanujanForCausalLM(tiny_moe_config())
    meter = ExpertLoadMeter(model)
    batches = [torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (3, 5))]
    per_forward = []
    model.train()
    for batch in batches:
        router_logits = model(batch, output_router_logits=True).router_logits
        counts = torch.zeros(len(router_logits), model.config.num_experts)
        for layer, logits in enumerate(router_logits):
            for token_logits in logits:
                for expert in token_logits.topk(model.config.num_experts_per_tok).indices.tolist():
                    counts[layer, expert] += 1
        per_forward.append(counts / counts.sum(dim=1, keepdim=True))
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (4, 7)))  # not a training forward: not counted
    expected = torch.stack(per_forward).mean(dim=0)
    reading = meter.read_and_reset()
    assert reading["expert_load_max"] == pytest.approx(expected.max().item(), abs=1e-6)
    assert reading["expert_load_min"] == pytest.approx(expected.min().item(), abs=1e-6)
    assert meter.read_and_reset() == {}  # reset: nothing since the last read


def test_moe_router_losses_are_part_of_the_trainer_loss(moe_checkpoint, prompt_response_file, tmp_path):
    arguments = parse_arguments(
        DataArguments,
        ["--model_name_or_path", moe_checkpoint, "--train_file", prompt_response_file, "--prompt_column", "question",
         "--response_column", "answer", "--output_dir", str(tmp_path), *QUIET],
        prog="test",
    )
    trainer = build_trainer(*arguments)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, batch)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
    cross_entropy = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    config = model.config
    router = config.router_aux_loss_coef * switch_balance_loss(
        outputs.router_logits, config.num_experts_per_tok, batch["attention_mask"]
    ) + config.router_z_loss_coef * router_z_loss(outputs.router_logits, batch["attention_mask"])
    assert router > 0
    assert trainer_loss.item() == pytest.approx((cross_entropy + router).item(), rel=1e-5)


def test_moe_lora_on_prompt_response_saves_adapter_and_merges_exactly(moe_checkpoint, prompt_response_file, tmp_path):
    output = tmp_path / "out"
    assert finetune(
        "--model_name_or_path", moe_checkpoint, "--train_file", prompt_response_file, "--prompt_column", "question",
        "--response_column", "answer", "--validation_split_percentage", 25, "--max_steps", 3,
        "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--use_lora", "--lora_r", 4,
        "--merge_lora", "--save_strategy", "no", "--output_dir", output,
    ) == 0
    adapter_config = read_json(output / "adapter_config.json")
    assert set(adapter_config["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    adapter_weights = load_file(output / "adapter_model.safetensors")
    assert any("experts" in name for name in adapter_weights)
    assert "eval_perplexity" in read_json(output / "eval_results.json")

    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    base = RamanujanForCausalLM.from_pretrained(moe_checkpoint)
    base_logits = base(input_ids).logits
    adapted_logits = PeftModel.from_pretrained(base, output)(input_ids).logits
    merged_logits = RamanujanForCausalLM.from_pretrained(output / "merged")(input_ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # training moved the adapters
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_lora_targets_modules_in_dense_models_and_expert_parameters_only_in_moe():
    dense = lora_config(RamanujanForCausalLM(tiny_config()), LoraArguments(use_lora=True), "CAUSAL_LM")
    assert dense.target_parameters is None
    assert set(dense.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    attention_only = lora_config(
        RamanujanForCausalLM(tiny_moe_config()), LoraArguments(use_lora=True, lora_target_modules="q_proj,v_proj"), "CAUSAL_LM"
    )
    assert attention_only.target_parameters is None
    with pytest.raises(ValueError, match="no module named wq"):
        lora_config(RamanujanForCausalLM(tiny_config()), LoraArguments(use_lora=True, lora_target_modules="q_proj,wq"), "CAUSAL_LM")


def test_chat_run_trains_on_messages(dense_checkpoint, tmp_path):
    data = tmp_path / "chat.jsonl"
    conversations = [
        {"messages": [{"role": "user", "content": f"Count to {i}"}, {"role": "assistant", "content": " ".join(map(str, range(i)))}]}
        for i in range(1, 13)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in conversations))
    output = tmp_path / "out"
    assert finetune(
        "--model_name_or_path", dense_checkpoint, "--train_file", data, "--messages_column", "messages",
        "--validation_split_percentage", 25, "--max_steps", 2, "--per_device_train_batch_size", 4,
        "--save_strategy", "no", "--output_dir", output,
    ) == 0
    assert set(read_json(output / "eval_results.json")) >= {"eval_loss", "eval_perplexity"}


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(dense_checkpoint, prompt_response_file, tmp_path):
    common = [
        "--model_name_or_path", dense_checkpoint, "--train_file", prompt_response_file, "--prompt_column", "question",
        "--response_column", "answer", "--max_steps", 4, "--per_device_train_batch_size", 4, "--learning_rate", 1e-2,
        "--save_steps", 2, "--do_train",
    ]
    assert finetune(*common, "--output_dir", tmp_path / "full") == 0
    # Mark the step-2 state: a run that really resumed carries the mark; one that restarted from step 0 does not.
    state_file = tmp_path / "full" / "checkpoint-2" / "trainer_state.json"
    state = read_json(state_file)
    state["log_history"][-1]["resumed_marker"] = 1
    state_file.write_text(json.dumps(state))
    assert finetune(
        *common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "full" / "checkpoint-2"
    ) == 0
    history = read_json(tmp_path / "resumed" / "trainer_state.json")["log_history"]
    assert [entry["step"] for entry in history if "resumed_marker" in entry] == [2]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 3, 4]
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-6, rtol=1e-5)


# --- bad input: one line on stderr, exit status 2, nothing trained --------------------------------------------------


def assert_rejected(capsys, command, output, *arguments, message):
    """Exit status 2, the message as the last stderr line (earlier lines: datasets' progress bars), no output."""
    assert command(*arguments, "--output_dir", output, "--max_steps", 1) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and message in error, error
    assert not output.exists()


def test_missing_column_names_the_columns_that_exist(capsys, dense_checkpoint, prompt_response_file, tmp_path):
    assert_rejected(
        capsys, finetune, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", prompt_response_file,
        "--prompt_column", "question", "--response_column", "reply",
        message="no column 'reply' (columns: question, answer)",
    )


def test_text_column_with_nulls_is_rejected(capsys, dense_checkpoint, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": None if i == 3 else f"line {i}"}) + "\n" for i in range(20)))
    assert_rejected(
        capsys, finetune, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", data,
        "--validation_split_percentage", 20, message="1 null value(s) in column 'text'",
    )


def test_checkpoint_that_is_no_causal_lm_is_rejected(capsys, prompt_response_file, tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    assert_rejected(
        capsys, finetune, tmp_path / "out", "--model_name_or_path", tmp_path / "vit", "--train_file", prompt_response_file,
        message="is a 'vit' checkpoint, which has no causal-LM model",
    )


def test_directory_without_a_checkpoint_is_rejected(capsys, prompt_response_file, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_rejected(
        capsys, finetune, tmp_path / "out", "--model_name_or_path", tmp_path / "empty", "--train_file", prompt_response_file,
        message="cannot load a model config from",
    )
    assert_rejected(
        capsys, finetune, tmp_path / "out", "--model_name_or_path", tmp_path / "absent", "--train_file", prompt_response_file,
        message="does not exist",
    )


# --- sequence classification ---------------------------------------------------------------------------------------

ALPHABETS = ["abcdefghijklm", "nopqrstuvwxyz", "0123456789"]


def write_csv(path, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def separable_rows(labels, count, seed):
    """The i-th label owns the i-th of disjoint alphabets: any one character of a text tells its class."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        index = rng.randrange(len(labels))
        text = "".join(rng.choice(ALPHABETS[index]) for _ in range(rng.randint(4, 12)))
        rows.append((text, labels[index]))
    return rows


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

    card = (output / "README.md").read_text()  # a classifier's card: its head, labels and how to load it
    assert "pipeline_tag: text-classification" in card and "sequence-classification head" in card
    assert "Labels: neg, pos" in card and "AutoModelForSequenceClassification.from_pretrained" in card
    assert "AutoModelForCausalLM" not in card and "generate(" not in card and "accuracy and F1" in card


def test_moe_lora_with_integer_labels_merges_exactly(moe_checkpoint, tmp_path):
    checkpoint = moe_checkpoint
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
    assert "adds no router losses" in (output / "README.md").read_text()  # an MoE classifier's card says so

    merged = AutoModelForSequenceClassification.from_pretrained(output / "merged").eval()
    assert merged.config.id2label == {0: "0", 1: "1", 2: "2"}
    base = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=3, id2label=merged.config.id2label, label2id=merged.config.label2id
    )
    adapted = PeftModel.from_pretrained(base, output).eval()  # the trained score head comes with the adapter
    input_ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, adapted(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_validation_label_unseen_in_training_is_rejected(capsys, dense_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 20, seed=0))
    validation = write_csv(tmp_path / "validation.csv", separable_rows(["neg", "mid"], 20, seed=1))
    assert_rejected(
        capsys, classify, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", train,
        "--validation_file", validation, message="label(s) the training data lacks: 'mid'",
    )


def test_missing_label_column_names_the_columns_that_exist(capsys, dense_checkpoint, tmp_path):
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 40, seed=0))
    assert_rejected(
        capsys, classify, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", train,
        "--validation_split_percentage", 20, "--label_column", "sentiment", message="no column 'sentiment' (columns: text, label)",
    )


def test_classification_text_column_with_nulls_is_rejected(capsys, dense_checkpoint, tmp_path):
    rows = [{"text": None if i == 5 else f"text {i}", "label": i % 2} for i in range(20)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_rejected(
        capsys, classify, tmp_path / "out", "--model_name_or_path", dense_checkpoint, "--train_file", train,
        "--validation_split_percentage", 20, message="null value(s) in column 'text'",
    )


def test_checkpoint_without_a_classification_model_is_rejected(capsys, tmp_path):
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "vit")
    train = write_csv(tmp_path / "train.csv", separable_rows(["neg", "pos"], 20, seed=0))
    assert_rejected(
        capsys, classify, tmp_path / "out", "--model_name_or_path", tmp_path / "vit", "--train_file", train,
        message="is a 'vit' checkpoint, which has no sequence-classification model",
    )
