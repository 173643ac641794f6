"""LoRA on every Linear of every transformer block (stage 4 option), merged into full weights at export.

A wrapped Linear keeps its own parameter names (weight, bias) and gains lora_A.weight [r, in] and
lora_B.weight [out, r]; y = W x + b + (alpha / r) B A x. B starts at zero, so wrapping changes nothing
until training moves it. `adapter_state_dict` names tensors the PEFT way,
base_model.model.blocks.N.<module>.lora_A/B.weight, which shotstream_core.loading.merge_lora reads.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """nn.Linear plus a trainable low-rank update; the base weight and bias are frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        p = base.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=p.device, dtype=p.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=p.device, dtype=p.dtype)
        # nn.Linear's own init (kaiming uniform, a = sqrt(5): U(+-1/sqrt(in))), drawn on the CPU from
        # `generator` so that a run is the same on every device and every time
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.weight.copy_(torch.empty(rank, self.in_features).uniform_(-bound, bound, generator=generator))
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha = rank, float(alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x):
        return super().forward(x) + self.scale * self.lora_B(self.lora_A(x))

    def merged_weight(self) -> torch.Tensor:
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()  # [out, in]
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None,
               generator: torch.Generator | None = None) -> list[str]:
    """Freeze `model` and wrap every nn.Linear inside model.blocks; returns the wrapped module names. The
    A matrices are drawn from `generator` (a training stage passes a seeded one)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name.startswith("blocks."):
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:  # not LoRALinear: applying twice is an error below
                setattr(module, child_name, LoRALinear(child, rank, alpha, generator))
                wrapped.append(f"{name}.{child_name}")
            elif isinstance(child, LoRALinear):
                raise ValueError(f"{name}.{child_name} already has a LoRA adapter")
    if not wrapped:
        raise ValueError("apply_lora found no Linear layers under model.blocks: is this a WanDiT?")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors (plus a per-module .alpha so merge_lora needs no extra argument)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
        out[f"{PEFT_PREFIX}{name}.alpha"] = torch.tensor(m.alpha)
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight and the lora keys dropped:
    loads into a plain WanDiT / CausalWanDiT of the same config."""
    sd = {k: v.detach() for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
    for name, m in lora_modules(model).items():
        sd[f"{name}.weight"] = m.merged_weight().detach()
    return sd
