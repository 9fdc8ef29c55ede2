"""PEFT LoRA for the fine-tuning scripts: which weights get adapters, and the merged model.

Dense layers hold `gate_proj`/`up_proj`/`down_proj` as `nn.Linear` modules, which PEFT's `target_modules`
finds by name. MoE layers hold their experts as fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`, the Transformers v5 layout), which no module name matches: for those, naming an FFN
projection also adds the matching expert parameters to PEFT's `target_parameters` (LoRA on an `nn.Parameter`,
PEFT ≥ 0.17, one rank-r update per expert). Shared experts are plain MLPs and match by name. The router is
never adapted. PEFT's parameter LoRA does not support dropout, so none is offered.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# FFN projection name -> the fused expert parameter that holds it in an MoE layer.
EXPERT_PARAMETERS = {
    "gate_proj": "mlp.experts.gate_up_proj",
    "up_proj": "mlp.experts.gate_up_proj",
    "down_proj": "mlp.experts.down_proj",
}


@dataclass
class LoraArguments:
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights (PEFT)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha / r."})
    lora_target_modules: str = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={
            "help": "Comma-separated module names to adapt. In MoE layers gate_proj/up_proj/down_proj also adapt "
            "the fused expert weights."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "After training, also write the adapters merged into the base weights to OUTPUT_DIR/merged."},
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be at least 1, got {self.lora_r}")
        if not self.target_modules:
            raise ValueError("--lora_target_modules is empty")
        if self.merge_lora and not self.use_lora:
            raise ValueError("--merge_lora needs --use_lora")

    @property
    def target_modules(self) -> list[str]:
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


def lora_config(model, arguments: LoraArguments, task_type: str) -> LoraConfig:
    """LoraConfig for `model`: the named modules, plus the fused expert parameters when the model has MoE layers."""
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in arguments.target_modules if name not in module_names and name not in EXPERT_PARAMETERS]
    if missing:
        raise ValueError(f"--lora_target_modules: the model has no module named {', '.join(missing)}")
    parameter_names = {name for name, _ in model.named_parameters()}
    expert_parameters = sorted(
        {
            EXPERT_PARAMETERS[name]
            for name in arguments.target_modules
            if name in EXPERT_PARAMETERS and any(p.endswith(EXPERT_PARAMETERS[name]) for p in parameter_names)
        }
    )
    return LoraConfig(
        task_type=task_type,
        r=arguments.lora_r,
        lora_alpha=arguments.lora_alpha,
        target_modules=arguments.target_modules,
        target_parameters=expert_parameters or None,
    )


def apply_lora(model, arguments: LoraArguments, task_type: str) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (PEFT's zero-initialized B: the output is unchanged at step 0)."""
    return get_peft_model(model, lora_config(model, arguments, task_type))


def save_merged(peft_model: PeftModel, tokenizer, path: str | os.PathLike) -> Path:
    """Merge the adapters into the base weights (`merge_and_unload`, in place) and save a plain checkpoint.

    Call it last: `peft_model` is consumed. Written to a temporary folder beside `path`, then renamed, so `path`
    never holds half a model.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(temporary)
    if tokenizer is not None:
        tokenizer.save_pretrained(temporary)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(temporary, path)
    return path
