"""Model cards for checkpoints of this package: metadata, architecture, init scales, compute, measured metrics.

`write_model_card` fills the Jinja templates in `templates/` (`dense.md` or `moe.md`, both extending `base.md`)
from a config and a run's measured numbers, and writes `output_dir/README.md`. The YAML header comes from
`huggingface_hub.ModelCardData`, so the Hub reads it (`model-index` carries the evaluation results) and
`huggingface_hub.ModelCard.load` parses it back. The card says only what was measured.
"""

import math
import os
import platform
from pathlib import Path

import jinja2
import torch
from accelerate import init_empty_weights
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .. import modeling_ramanujan
from ..files import write_text_atomically
from ..initialization_ramanujan import deepnorm_alpha, ramanujan_layer_scales, residual_multiplier, weight_std

TEMPLATES_DIR = Path(__file__).parent / "templates"
LICENSE = "apache-2.0"

# Evaluation keys that measure quality (they go into `model-index`), with their display names.
# Other scalar results (runtime, samples/s, epoch …) appear in the card's table only.
QUALITY_METRICS = {
    "loss": "Loss (nats/token)",
    "perplexity": "Perplexity",
    "bits_per_byte": "Bits per byte",
    "accuracy": "Accuracy",
    "f1": "F1",
}

PIPELINE_TAGS = {
    "RamanujanForCausalLM": "text-generation",
    "RamanujanForSequenceClassification": "text-classification",
}


def write_model_card(
    output_dir,
    config,
    *,
    eval_results: dict,
    training: dict,
    dataset_name: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write `output_dir/README.md` (atomically) for a checkpoint of `config` and return its path; the card is
    `render_model_card`'s, named after the directory."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise ValueError(f"write_model_card: output_dir {output_dir} is not a directory")
    card = render_model_card(config, model_name=output_dir.resolve().name, eval_results=eval_results, training=training,
                             dataset_name=dataset_name, base_model=base_model)
    return write_text_atomically(output_dir / "README.md", str(card))


def render_model_card(
    config,
    *,
    model_name: str,
    eval_results: dict,
    training: dict,
    dataset_name: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """The model card for a checkpoint of `config`, called `model_name` (a directory name or a Hub repo id).

    eval_results: the run's final evaluation (`eval_results.json`: `eval_loss`, `perplexity`, `bits_per_byte` …);
    training: `steps`, `tokens`, `wall_time_s`, `hardware`, `hyperparameters` (dict) — any may be missing;
    dataset_name: the training data (a Hub dataset id or a file name); base_model: the Hub id a fine-tune started from.
    """
    architecture = (config.architectures or ["RamanujanForCausalLM"])[0]
    pipeline_tag = PIPELINE_TAGS.get(architecture, "text-generation")
    classifier = pipeline_tag == "text-classification"  # the card's wording and how-to-use code follow the head
    metrics = scalar_metrics(eval_results)
    eval_entries = eval_result_entries(metrics, pipeline_tag, dataset_name)
    card_data = ModelCardData(
        model_name=model_name if eval_entries else None,  # only `model-index` uses it
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=LICENSE,
        tags=["ramanujan", f"{config.init_scheme}-init", "custom_code"] + (["moe"] if config.is_moe else []),
        datasets=[hub_dataset_id(dataset_name)] if hub_dataset_id(dataset_name) else None,
        base_model=base_model,
        metrics=[name for name in metrics if name in QUALITY_METRICS] or None,
        eval_results=eval_entries or None,
    )
    template = "moe.md" if config.is_moe else "dense.md"
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    content = environment.get_template(template).render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        architecture=architecture,
        classifier=classifier,
        auto_class="AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM",
        dataset_name=dataset_name,
        base_model=base_model,
        config=config,
        num_parameters=count_parameters(config, architecture),
        init_rows=init_scale_rows(config),
        depth_schemes=depth_schemes(config),
        embedding_std=format_number(weight_std(config, "embedding", config.hidden_size, config.vocab_size)),
        lm_head_std=format_number(weight_std(config, "lm_head", config.hidden_size, config.vocab_size)),
        metrics=[(QUALITY_METRICS.get(name, name), format_number(value)) for name, value in metrics.items()],
        compute=compute_rows(training),
        hyperparameters=[(name, value) for name, value in sorted((training.get("hyperparameters") or {}).items())],
    )
    return ModelCard(content)  # parses the YAML header back: a card the Hub would reject fails here


def scalar_metrics(eval_results: dict) -> dict[str, float]:
    """Numeric results keyed without the `eval_` prefix Trainer and our scripts put on them."""
    metrics = {}
    for key, value in (eval_results or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[key.removeprefix("eval_")] = value
    return metrics


def hub_dataset_id(dataset_name: str | None) -> str | None:
    """`dataset_name` when it can be a Hub dataset id (what the `datasets` metadata holds), else None."""
    if not dataset_name:
        return None
    try:
        validate_repo_id(dataset_name)
    except HFValidationError:
        return None
    return dataset_name


def eval_result_entries(metrics: dict[str, float], task_type: str, dataset_name: str | None) -> list[EvalResult]:
    """One `model-index` entry per quality metric, all on the held-out split of the training data."""
    return [
        EvalResult(
            task_type=task_type,
            dataset_type=hub_dataset_id(dataset_name) or "text",
            dataset_name=dataset_name or "custom text (held-out split)",
            dataset_split="validation",
            metric_type=name,
            metric_name=QUALITY_METRICS[name],
            metric_value=value,
        )
        for name, value in metrics.items()
        if name in QUALITY_METRICS
    ]


def count_parameters(config, architecture: str) -> int:
    """Parameters of the model `config` builds (tied weights counted once), built on the meta device: no memory."""
    model_class = getattr(modeling_ramanujan, architecture, modeling_ramanujan.RamanujanForCausalLM)
    with init_empty_weights():
        model = model_class(config)
    return model.num_parameters()


def depth_schemes(config) -> list[str]:
    """The depth schemes the config switches on, each as the card's one-line description (none: an empty list)."""
    schemes = []
    if config.depth_parametrization is not None:
        schemes.append(f"{config.depth_parametrization}: every attention and MLP branch × "
                       f"{residual_multiplier(config):.4g} (L0 = {config.depth_base_layers})")
    if config.layernorm_scaling:
        schemes.append("LayerNorm Scaling: the pre-norms of layer l (from 1) × 1/√l")
    if config.deepnorm:
        schemes.append(f"DeepNorm post-norm layers: x ← norm({deepnorm_alpha(config.num_hidden_layers):.4g}·x + f(x))")
    return schemes


def init_scale_rows(config) -> list[dict]:
    """Per decoder layer: the Ramanujan multiplier (for that scheme) and the std each weight was drawn with.

    The stds come from `initialization_ramanujan.weight_std`, the same function `_init_weights` uses.
    """
    scales = ramanujan_layer_scales(config) if config.init_scheme == "ramanujan" else None
    attention_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    rows = []
    for layer in range(config.num_hidden_layers):
        moe = config.is_moe_layer(layer)
        ffn_width = config.moe_intermediate_size if moe else config.intermediate_size
        rows.append(
            {
                "layer": layer,
                "kind": "MoE" if moe else "dense",
                "scale": f"{scales[layer]:.4f}" if scales else "—",
                "qk_std": format_number(weight_std(config, "linear", config.hidden_size, attention_width, layer)),
                "v_std": format_number(weight_std(config, "value_projection", config.hidden_size, kv_width, layer)),
                "o_std": format_number(weight_std(config, "output_projection", attention_width, config.hidden_size, layer)),
                "gate_std": format_number(weight_std(config, "gate_projection", config.hidden_size, ffn_width, layer)),
                "up_std": format_number(weight_std(config, "up_projection", config.hidden_size, ffn_width, layer)),
                "down_std": format_number(weight_std(config, "output_projection", ffn_width, config.hidden_size, layer)),
                "router_std": format_number(weight_std(config, "router", config.hidden_size, config.num_experts, layer))
                if moe
                else "—",
            }
        )
    return rows


def compute_rows(training: dict) -> list[tuple[str, str]]:
    """Steps, tokens, wall time and hardware, each only when the run recorded it."""
    rows = []
    if training.get("steps") is not None:
        rows.append(("Optimizer steps", f"{int(training['steps']):,}"))
    if training.get("tokens") is not None:
        rows.append(("Training tokens", f"{int(training['tokens']):,}"))
    if training.get("wall_time_s") is not None:
        seconds = float(training["wall_time_s"])
        rows.append(("Wall time", f"{seconds:.1f} s" + (f" ({seconds / 3600:.2f} h)" if seconds >= 3600 else "")))
    if training.get("hardware"):
        rows.append(("Hardware", str(training["hardware"])))
    return rows


def hardware_description(device, num_processes: int) -> str:
    """The card's "Hardware" fact, the same for pretraining and fine-tuning: process count and device name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{os.cpu_count()}-core {device.type.upper()} ({platform.machine()})"
    return f"{num_processes} process{'es' if num_processes > 1 else ''} on {name}"


def format_number(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


__all__ = ["hardware_description", "render_model_card", "write_model_card"]
