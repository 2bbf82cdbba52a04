"""Our own call path for peft's LoRA layers on the shared UNet (issue 35): the same adapters, parameters and files,
with two things peft's forward does not do.

1. **Rows routed to adapters in one call.** ``routed(unet, [(None, 2B), ("fake", B)])`` makes every LoRA layer send
   its first 2B rows through the base weights alone and the next B through adapter ``fake``: the real score's CFG rows
   and the fake score's rows in one UNet forward (the UNet mixes nothing across samples: no batch norm). peft's own
   mixed batches (``adapter_names=``) refuse training mode; this works with or without gradients, under gradient
   checkpointing (the routing is pinned with the adapter state, shared_unet.checkpoint_pinning_adapters) and under
   torch.compile (one graph per routing: a handful, compiled once).
2. **The cheaper of two exact forms, per layer and call.** A rank-r LoRA branch costs r (in_k + out) multiply-adds
   per output position (three times that with gradients); the merged form computes W + s B A once per call and runs
   one convolution, and with gradients takes the full weight gradient (in_k out per position) from which A's and B's
   follow by two small matmuls (:class:`_MergedLora`, which recomputes W + s B A in the backward instead of keeping
   it). At the digits' widths (48-96 channels, r = 32) the merged form is the cheaper everywhere; at SD1.5's (320-1280,
   r = 64) only without gradients. It is used only where the merged sum is as exact as the branch: fp32 weights and
   inputs, no autocast, on the CPU, at "highest" fp32 matmul precision. In bf16/fp16/TF32, W + s B A would round the
   adapter's small update against W's much larger entries (below W's last bit it vanishes), so those calls keep the
   branch.

Anything else (dropout, DoRA, a LoRA bias, extra forward arguments, merged peft weights) falls back to peft's forward.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Rows = Optional[tuple]  # ((adapter name or None, number of rows), ...) or None: peft's active adapter for all rows


class _MergedLora(torch.autograd.Function):
    """y = op(x, W + s B A) with gradients for x, A and B (W frozen). Saves x, W, A, B, not W + s B A."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, conv: Optional[tuple]):
        w = weight + scale * (b.flatten(1) @ a.flatten(1)).view_as(weight)
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale, ctx.conv = scale, conv
        return F.conv2d(x, w, bias, *conv) if conv is not None else F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, a, b = ctx.saved_tensors
        s, conv = ctx.scale, ctx.conv
        w = weight + s * (b.flatten(1) @ a.flatten(1)).view_as(weight)
        want_x = ctx.needs_input_grad[0]
        if conv is not None:
            stride, padding, dilation, groups = conv
            gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, stride, padding, dilation, False, [0, 0],
                                                             groups, [want_x, True, False])
        else:
            gx = gy @ w if want_x else None
            gw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        gw = gw.flatten(1)
        ga = (s * (b.flatten(1).t() @ gw)).view_as(a) if ctx.needs_input_grad[3] else None
        gb = (s * (gw @ a.flatten(1).t())).view_as(b) if ctx.needs_input_grad[4] else None
        return gx, None, None, ga, gb, None, None


def _merged_pays(base: torch.nn.Module, a: torch.Tensor, grad: bool) -> bool:
    """Multiply-adds per output position of the merged form against the branch's. The merge itself (out r in_k, once
    per call) is left out, so that the choice depends on the layer alone, never on the batch: a batch split into
    micro-batches or over processes takes the same form everywhere (tests/test_correctness.py, test_invariance.py)."""
    out, r, in_k = base.weight.shape[0], a.shape[0], a[0].numel()
    return not grad or in_k * out < 3 * r * (in_k + out)


@torch.compiler.assume_constant_result
def _fp32_highest() -> bool:
    return torch.get_float32_matmul_precision() == "highest"


def _merge_exact(x: torch.Tensor, base: torch.nn.Module) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and base.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and _fp32_highest())


class RoutedLora:
    """Mixed into peft's lora.Linear / lora.Conv2d classes (the instances' class is swapped by :func:`install`)."""

    _sd_dmd_rows: Rows = None
    _sd_dmd_merge: bool = True  # train.lora_merge; false keeps the branch everywhere (for comparison)

    def _sd_dmd_plain(self, adapter: str, args, kwargs) -> bool:
        return (not args and not kwargs and not self.merged and adapter not in self.lora_variant
                and isinstance(self.lora_dropout[adapter], torch.nn.Identity) and not self.lora_bias[adapter]
                and self.lora_B[adapter].bias is None)

    def _sd_dmd_call(self, x: torch.Tensor, adapter: Optional[str]) -> torch.Tensor:
        base = self.base_layer
        if adapter is None or adapter not in self.lora_A:
            return base(x)
        a, b, s = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        conv = isinstance(base, torch.nn.Conv2d)
        if (self._sd_dmd_merge and _merge_exact(x, base) and (not conv or (base.groups == 1 and base.dilation == (1, 1)
                                                      and base.padding_mode == "zeros" and not isinstance(base.padding, str)))):
            grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or x.requires_grad)
            if _merged_pays(base, a, grad):
                return _MergedLora.apply(x, base.weight, base.bias, a, b, s,
                                         (base.stride, base.padding, base.dilation, base.groups) if conv else None)
        result = base(x)
        return (result + self.lora_B[adapter](self.lora_A[adapter](x.to(a.dtype))) * s).to(result.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = self._sd_dmd_rows
        if rows is None:
            if self.disable_adapters:
                return super().forward(x, *args, **kwargs)
            active = self.active_adapters
            if len(active) != 1 or not self._sd_dmd_plain(active[0], args, kwargs):
                return super().forward(x, *args, **kwargs)
            return self._sd_dmd_call(x, active[0])
        if args or kwargs or self.merged or any(n is not None and not self._sd_dmd_plain(n, (), {}) for n, _ in rows):
            raise ValueError("routed LoRA calls take plain LoRA layers only (no dropout, DoRA, bias or extra arguments)")
        pieces = x.split([k for _, k in rows])
        return torch.cat([self._sd_dmd_call(p, n) for p, (n, _) in zip(pieces, rows)])


_CLASSES: dict = {}


def _routed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Routed{cls.__name__}", (RoutedLora, cls), {"__module__": __name__})
    return _CLASSES[cls]


def install(layers: Sequence[torch.nn.Module]) -> None:
    """Give peft's Linear and Conv2d LoRA layers this module's forward (other kinds keep peft's)."""
    from peft.tuners.lora import layer as lora

    for m in layers:
        if type(m) in (lora.Linear, lora.Conv2d):
            m.__class__ = _routed_class(type(m))


def set_merge(layers: Sequence[torch.nn.Module], on: bool) -> None:
    for m in layers:
        if isinstance(m, RoutedLora):
            m._sd_dmd_merge = bool(on)


def set_rows(layers: Sequence[torch.nn.Module], rows: Rows) -> None:
    for m in layers:
        if isinstance(m, RoutedLora):
            m._sd_dmd_rows = rows


@contextlib.contextmanager
def routed(layers: Sequence[torch.nn.Module], rows: Sequence[tuple]):
    """Within: each call's rows go, in order, to the adapters in ``rows`` ((name or None, count), ...)."""
    set_rows(layers, tuple((n, int(k)) for n, k in rows))
    try:
        yield
    finally:
        set_rows(layers, None)
