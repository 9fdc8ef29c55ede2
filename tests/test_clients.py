"""Clients nobody here wrote, run on our models the way their users run them (offline, CPU, tiny models).

TRL's SFTTrainer (dense and MoE: it treats a config with `output_router_logits` as MoE and adds the router loss),
lm-evaluation-harness's HFLM (generate_until and loglikelihood requests, checked against our own generate and
log-probabilities), PEFT's LoRA as its documentation shows it, and Transformers' own text-generation pipeline.
"""

import pytest
import torch
from conftest import tiny_config, tiny_moe_config
from datasets import Dataset
from transformers import set_seed

from acx_ramanujan import RamanujanByteTokenizer, RamanujanForCausalLM

CONFIGS = {"dense": tiny_config, "moe": tiny_moe_config}


def tiny_model(kind: str) -> RamanujanForCausalLM:
    set_seed(0)
    return RamanujanForCausalLM(CONFIGS[kind]()).eval()


@pytest.mark.parametrize("kind", CONFIGS)
def test_trl_sft_trainer_trains_dense_and_moe(kind, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = tiny_model(kind)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    dataset = Dataset.from_dict({"text": [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(8)]})
    arguments = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, max_length=64,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=arguments, train_dataset=dataset,
                         processing_class=RamanujanByteTokenizer())
    result = trainer.train()

    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])]
    assert "model.embed_tokens.weight" in changed
    # TRL adds the load-balancing loss for MoE models only, and logs it.
    assert trainer.aux_loss_enabled == (kind == "moe")
    aux_losses = [entry["aux_loss"] for entry in trainer.state.log_history if "aux_loss" in entry]
    if kind == "moe":
        assert aux_losses and all(value > 0 for value in aux_losses)
    else:
        assert not aux_losses


def greedy_continuation(model, tokenizer, context: str, new_tokens: int) -> str:
    """Our greedy continuation, without a KV cache: a reference independent of the cache path the harness uses."""
    ids = torch.tensor([tokenizer(context)["input_ids"]])  # with BOS, as the harness encodes (tokenizer default)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id, use_cache=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("kind", CONFIGS)
def test_lm_eval_harness_generates_and_scores_like_our_model(kind):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model(kind), RamanujanByteTokenizer()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    context, continuation = "To be, or not to be", ": that is the question"

    (generated,) = lm.generate_until([Instance(
        request_type="generate_until", doc={}, idx=0,
        arguments=(context, {"until": ["never-generated"], "max_gen_toks": 12, "do_sample": False}),
    )])
    assert generated.strip()
    assert generated == greedy_continuation(model, tokenizer, context, 12)

    ((log_likelihood, is_greedy),) = lm.loglikelihood([Instance(
        request_type="loglikelihood", doc={}, idx=0, arguments=(context, continuation)
    )])
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, len(context_ids):]
    expected = log_probs[len(context_ids) - 1:].gather(-1, targets[:, None]).sum().item()
    assert log_likelihood == pytest.approx(expected, abs=1e-4)
    assert is_greedy == bool((log_probs[len(context_ids) - 1:].argmax(-1) == targets).all())


def test_peft_default_targets_do_not_know_our_model_type():
    """Why our LoRA helper and the README name target modules: PEFT's defaults cover only the model types it ships."""
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(tiny_model("dense"), LoraConfig(task_type="CAUSAL_LM"))


@pytest.mark.parametrize("kind", CONFIGS)
def test_peft_lora_all_linear_trains_only_adapters(kind):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(kind)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, reference)  # B starts at zero
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("self_attn.q_proj" in name for name in trainable)

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, reference)


@pytest.mark.parametrize("kind", CONFIGS)
def test_text_generation_pipeline_equals_uncached_greedy_generate(kind, tmp_path):
    """Transformers' `pipeline("text-generation")` from a saved folder (what its users do), one prompt and a batch that
    the pipeline left-pads: the text equals greedy decoding without the KV cache, token for token. (On 5.24 before the
    cache fix the pipeline's text differed: it lost its cache.) Transformers' own PipelineTesterMixin cannot run here:
    it loads tiny models and tokenizers from the Hub by architecture name, which has none for a model outside the
    library."""
    from transformers import pipeline

    model, tokenizer = tiny_model(kind), RamanujanByteTokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    prompts = ["To be, or not to be", "Hi"]
    outputs = generator(prompts, max_new_tokens=8, do_sample=False, batch_size=2, return_full_text=False)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)[0, ids.shape[1]:]
        assert output[0]["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
