"""LoRA: low-rank adapters on chosen linear layers, merging, and PEFT-format export.

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)        A (r, in), B (out, r), B = 0 at init

LoRALinear subclasses nn.Linear and keeps `weight`/`bias` under their names (frozen),
so the base state dict is unchanged and code that reads `.weight` keeps working. The
adapter parameters are `lora_A`/`lora_B`; PEFT calls them `lora_A.weight`/`lora_B.weight`
under a `base_model.model.` prefix, which save_peft_adapter writes.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.kernels.lora import lora_linear

PEFT_TASK_TYPES = ("CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_CLS")


class LoRAError(ValueError):
    """A LoRA request that cannot be applied or exported."""


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank <= 0:
            raise LoRAError(f"LoRA rank must be > 0, got {rank}")
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float,
                    adapter_device: torch.device | None = None) -> "LoRALinear":
        """Wrap an existing layer, sharing its weight and bias tensors (no copy). The adapters go on
        adapter_device (default: the weight's), so a meta-device base still gets real, seeded adapters."""
        weight = linear.weight
        device = adapter_device or weight.device
        lora = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank,
                   alpha=alpha, dropout=dropout, device="meta", dtype=weight.dtype)
        lora.weight, lora.bias = linear.weight, linear.bias
        lora.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=device, dtype=weight.dtype))
        lora.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device, dtype=weight.dtype))
        lora.reset_lora_parameters()
        lora.train(linear.training)
        return lora

    def reset_parameters(self) -> None:
        # nn.Linear.__init__ calls this; the base weight is either loaded or shared, and a
        # meta-device construction must not touch memory, so only init when real.
        if self.weight.device.type != "meta":
            super().reset_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        # PEFT's default: A like nn.Linear (kaiming uniform, a=sqrt(5)), B zero, so the
        # adapted layer starts equal to the base layer.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        return lora_linear(x, self.weight, self.bias, self.lora_dropout(x), self.lora_A, self.lora_B, self.scaling)

    def delta_weight(self) -> Tensor:
        """(out, in): B A * scaling, the change LoRA makes to the weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
               adapter_device: torch.device | None = None) -> int:
    """Replace every nn.Linear whose name ends with a target (e.g. "q_proj") by a LoRALinear.

    Everything else is frozen; only the LoRA parameters train. Returns how many layers
    were adapted; none at all is an error (a typo in `targets` would otherwise train nothing).
    """
    if rank <= 0:
        raise LoRAError(f"lora.rank={rank} must be > 0 to apply LoRA")
    chosen = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and _matches(name, targets)
    ]
    if not chosen:
        raise LoRAError(f"no nn.Linear matches lora.targets={list(targets)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in chosen:
        lora = LoRALinear.from_linear(linear, rank, alpha, dropout, adapter_device)
        lora.weight.requires_grad_(False)
        if lora.bias is not None:
            lora.bias.requires_grad_(False)
        set_submodule(model, name, lora)
    return len(chosen)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold B A * scaling into each adapted weight and turn the layers back into nn.Linear."""
    merged = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in merged:
        lora.weight += lora.delta_weight().to(lora.weight.dtype)
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        linear.weight, linear.bias = lora.weight, lora.bias
        linear.train(lora.training)
        set_submodule(model, name, linear)
    return len(merged)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, under the model's own names (`...q_proj.lora_A`)."""
    return {name: p.detach() for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))}


def save_peft_adapter(model: nn.Module, folder: str, base_model_path: str, task_type: str = "CAUSAL_LM") -> None:
    """Write adapter_config.json + adapter_model.safetensors that peft.PeftModel.from_pretrained loads.

    task_type picks the Hugging Face class the adapter is for, hence its key prefix:
    CAUSAL_LM / SEQ_CLS wrap *ForCausalLM-style models whose backbone sits under `model.`
    (`base_model.model.model.layers.0...`); FEATURE_EXTRACTION wraps the bare backbone
    (AutoModel, what sentence-transformers loads), so keys are `base_model.model.layers.0...`.
    """
    if task_type not in PEFT_TASK_TYPES:
        raise LoRAError(f"task_type={task_type!r} is not one of {', '.join(PEFT_TASK_TYPES)}")
    adapters = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not adapters:
        raise LoRAError("the model has no LoRA layers to export (apply_lora first, or it was merged)")
    ranks = {m.rank for _, m in adapters}
    alphas = {m.alpha for _, m in adapters}
    if len(ranks) > 1 or len(alphas) > 1:
        raise LoRAError(f"PEFT export needs one rank and alpha for all layers; found ranks {ranks}, alphas {alphas}")
    tensors = {}
    for name, lora in adapters:
        if task_type == "FEATURE_EXTRACTION":
            name = name.removeprefix("model.")
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = lora.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = lora.lora_B.detach().contiguous().cpu()
    first = adapters[0][1]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_path,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name, _ in adapters}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
