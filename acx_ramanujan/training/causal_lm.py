"""`acx-rt finetune` (= training_scripts/finetune_clm.py): causal-LM fine-tuning with the Transformers Trainer.

Three kinds of data, one per row layout:
- plain text (`--text_column`): tokenized and packed into `--block_size` blocks exactly as pretraining does
  (`data.tokenize_and_pack`); every token is trained.
- prompt/response (`--prompt_column`, `--response_column`): `prompt + response + eos`, one example per row,
  the prompt positions labelled -100 so only the response is learned.
- chat (`--messages_column`, a list of {"role", "content"}): rendered with the tokenizer's chat template; only
  the assistant turns (with the template's end-of-turn marker) are learned.

Evaluation keeps two numbers per sequence instead of all logits (`preprocess_logits_for_metrics`): its summed
next-token NLL and its token count; the bundled `perplexity` metric turns them into the token-weighted `lm_loss`
and `perplexity`. `eval_loss` is Trainer's: the training objective, which for MoE models includes the router
losses, so `eval_lm_loss` is the pure language-model number. Results go to OUTPUT_DIR/eval_results.json.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, EvalPrediction, default_data_collator

from .data import tokenize_and_pack
from .finetune import (
    DataSourceArguments,
    ModelArguments,
    check_columns,
    load_checkpoint_config,
    load_checkpoint_tokenizer,
    make_trainer,
    run_cli,
)
from .lora import LoraArguments
from .metrics import load_metric

IGNORE_INDEX = -100  # the label the loss skips (torch cross_entropy's default ignore_index)


@dataclass
class DataArguments(DataSourceArguments):
    text_column: str = field(default="text", metadata={"help": "Column of plain text to pack into blocks."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column of prompts (masked out of the loss)."})
    response_column: str | None = field(default=None, metadata={"help": "Column of responses (learned)."})
    messages_column: str | None = field(
        default=None, metadata={"help": "Column of chat conversations, rendered with the tokenizer's chat template."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per training sequence (packed blocks; longer examples are cut). "
                  "Default: the model's max_position_embeddings."},
    )

    def __post_init__(self):
        super().__post_init__()
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("--prompt_column and --response_column go together")
        if self.messages_column and self.prompt_column:
            raise ValueError("give either --messages_column or --prompt_column/--response_column, not both")

    @property
    def columns(self) -> list[str]:
        """The columns this data layout reads."""
        return [self.messages_column] if self.messages_column else self.text_columns

    @property
    def text_columns(self) -> list[str]:
        """The columns that must hold strings."""
        if self.messages_column:
            return []
        if self.prompt_column:
            return [self.prompt_column, self.response_column]
        return [self.text_column]


def encode_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """`prompt + response + eos`, labels -100 on the prompt; the prompt gets the tokenizer's special tokens (bos)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """A conversation through the chat template; only the assistant turns are labelled.

    Each assistant turn's tokens are those that rendering the conversation up to and including it adds to
    rendering it up to its generation prompt — the tokens a model must produce at inference. This needs a
    template whose renderings of successive prefixes extend each other (true of common templates); others fail.
    """

    def render(turns, add_generation_prompt=False):
        return tokenizer.apply_chat_template(
            turns, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )

    input_ids, labels = [], []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if turn == 0:
            raise ValueError("a conversation starts with an assistant message: there is no prompt to answer")
        prompt = render(messages[:turn], add_generation_prompt=True)
        full = render(messages[: turn + 1])
        if prompt[: len(input_ids)] != input_ids or full[: len(prompt)] != prompt:
            raise ValueError(
                "the chat template renders a conversation prefix differently inside the longer conversation, "
                "so assistant turns cannot be located; use --prompt_column/--response_column data instead"
            )
        labels += [IGNORE_INDEX] * (len(prompt) - len(input_ids)) + full[len(prompt) :]
        input_ids = full
    if not input_ids:
        raise ValueError("a conversation has no assistant message to learn")
    return {
        "input_ids": input_ids[:max_length],
        "attention_mask": [1] * len(input_ids[:max_length]),
        "labels": labels[:max_length],
    }


def supervised_features(raw_datasets: DatasetDict, tokenizer, data_args: DataArguments, block_size: int) -> DatasetDict:
    """One labelled example per row (prompt/response or chat); rows left with nothing to learn are dropped."""
    if data_args.messages_column:
        if not tokenizer.chat_template:
            raise ValueError("--messages_column needs a tokenizer with a chat template; this one has none")

        def encode(row):
            return encode_chat(tokenizer, row[data_args.messages_column], block_size)
    else:

        def encode(row):
            return encode_prompt_response(tokenizer, row[data_args.prompt_column], row[data_args.response_column], block_size)

    encoded = raw_datasets.map(
        encode, remove_columns=raw_datasets["train"].column_names, num_proc=data_args.preprocessing_num_workers,
        desc="Tokenizing with prompt masking",
    )
    learnable = encoded.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]), desc="Dropping rows without response tokens")
    for split, dataset in learnable.items():
        if len(dataset) == 0:
            raise ValueError(f"no {split} row has a response token within block_size={block_size}")
    return learnable


def resolve_block_size(requested: int | None, config) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("the model config has no max_position_embeddings: pass --block_size")
        return limit
    if limit is not None and requested > limit:
        raise ValueError(f"--block_size {requested} exceeds the model's max_position_embeddings ({limit})")
    return requested


def sequence_nll(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """(batch, 2): each sequence's summed next-token NLL in nats and its number of predicted tokens.

    `preprocess_logits_for_metrics` hook: evaluation keeps these two numbers instead of (batch, seq, vocab) logits.
    MoE outputs reach here as (aux_loss, logits, z_loss): the logits are the one 3-D tensor.
    """
    if isinstance(logits, tuple):
        logits = next(tensor for tensor in logits if tensor.dim() == 3)
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counted = targets != IGNORE_INDEX
    return torch.stack([(nll * counted).sum(dim=1), counted.sum(dim=1).float()], dim=1)


def perplexity_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Token-weighted `lm_loss` and `perplexity` from the per-sequence NLL sums (the bundled perplexity metric)."""
    nll_sums, token_counts = prediction.predictions[:, 0], prediction.predictions[:, 1].astype("int64")
    result = load_metric("perplexity").compute(predictions=nll_sums, references=token_counts)
    return {"lm_loss": result["loss"], "perplexity": result["perplexity"]}


def build_trainer(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments, training_args):
    """Check every input, tokenize, load the model (+ LoRA): a Trainer ready to train. Raises ValueError on bad input."""
    config = load_checkpoint_config(model_args, AutoModelForCausalLM, "causal-LM")
    tokenizer = load_checkpoint_tokenizer(model_args, config)
    raw_datasets = data_args.load(data_args.columns[0], column_is_text=not data_args.messages_column)
    check_columns(raw_datasets, data_args.columns, data_args.text_columns)
    block_size = resolve_block_size(data_args.block_size, config)
    with training_args.main_process_first(desc="tokenization"):
        if data_args.prompt_column or data_args.messages_column:
            features = supervised_features(raw_datasets, tokenizer, data_args, block_size)
            collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        else:
            features = tokenize_and_pack(
                raw_datasets, tokenizer, block_size, data_args.text_column, data_args.preprocessing_num_workers
            )
            collator = default_data_collator
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, config=config, trust_remote_code=model_args.trust_remote_code
    )
    return make_trainer(
        model, "CAUSAL_LM", lora_args, training_args, tokenizer, features,
        data_collator=collator,
        compute_metrics=perplexity_metrics,
        preprocess_logits_for_metrics=sequence_nll,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(argv, DataArguments, build_trainer, prog="acx-rt finetune")
