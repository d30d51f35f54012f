"""`model.base_precision=fp8`: the frozen base's projections under LoRA run their matmuls in FP8 (torchao).

In LoRA training a base projection does two matmuls per micro-batch: the forward (x W^T) and the input's gradient
(g W); its weight never changes and gets no gradient. torchao's `convert_to_float8_training` swaps each chosen
`nn.Linear` (here: peft's `lora.Linear.base_layer`, never an adapter, expert, router or lm_head) for its
`Float8Linear`: e4m3 inputs and weights, e5m2 output gradients (`model.fp8_grad_dtype=e4m3`: e4m3 too),
tensorwise dynamic scales, `torch._scaled_mm` on the tensor cores. Where the library stops, for a frozen weight,
two pieces of glue:
- `Float8Linear`'s backward always computes the weight's gradient (a third matmul, as large as the other two, and
  it keeps the input alive for it); `FrozenFloat8Linear` runs only the two matmuls a frozen weight needs;
- its weight is cast to FP8 at every forward and kept until the backward. By default (`model.fp8_weight_cache=
  false`) ours casts it in the forward and again in the backward, keeping only the bf16 weight: no memory beyond
  bf16's. `model.fp8_weight_cache=true` casts each frozen weight once, at conversion, and keeps only that copy: the
  `weight` parameter then holds the e4m3 data (1 byte an element: the base's projections take half their bf16
  memory) and `weight_scale` its scale; no cast of a weight per micro-batch.
Everything that reads a bf16 base weight (the experts' upcycling, peft's injection) runs before the conversion;
a checkpoint keeps only the trainable tensors, and evaluation, chat and export build the base again from the model
files, so nothing reads a converted weight as bf16 (`FrozenFloat8Linear._apply` refuses a dtype cast of one).
Refused before weights on a CPU and on GPUs without FP8 (compute capability < 8.9): models/prechecks.py.
Measured: guide section 8.
"""

from __future__ import annotations

import torch

BASE_LAYER = "base_layer"  # peft's name for the frozen module a LoRA layer wraps


def frozen_lora_base(module: torch.nn.Module, fqn: str) -> bool:
    """torchao's module filter: a frozen nn.Linear that peft wraps, with both dims divisible by 16 (_scaled_mm)."""
    return (isinstance(module, torch.nn.Linear) and fqn.rsplit(".", 1)[-1] == BASE_LAYER
            and not module.weight.requires_grad and module.in_features % 16 == 0 and module.out_features % 16 == 0)


class _FrozenWeightMatmul(torch.autograd.Function):
    """x W^T in FP8 whose backward returns the input's gradient only (g W in FP8): W is frozen."""

    @staticmethod
    def forward(ctx, x, weight, weight_fp8, module):
        from torchao.float8.float8_training_tensor import GemmInputRole

        from lightning_moe.upstream import torchao_float8_cast

        cast, c, mm = torchao_float8_cast(), module.config, module.linear_mm_config
        # without the cache, the backward casts the weight again: keeping this cast alive until then would hold
        # every layer's FP8 copy at the peak, the memory the cache costs without its saving
        ctx.save_for_backward(weight if weight_fp8 is None else weight_fp8)
        ctx.module = module
        if weight_fp8 is None:  # no cache: cast the frozen weight now, as Float8Linear does
            weight_fp8 = cast(weight, c.cast_config_weight.target_dtype, mm, gemm_input_role=GemmInputRole.WEIGHT)
        x8 = cast(x.reshape(-1, x.shape[-1]), c.cast_config_input.target_dtype, mm,
                  gemm_input_role=GemmInputRole.INPUT)
        return torch.mm(x8, weight_fp8.t()).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole

        from lightning_moe.upstream import torchao_float8_cast

        (weight_fp8,) = ctx.saved_tensors
        c, mm = ctx.module.config, ctx.module.linear_mm_config
        if not isinstance(weight_fp8, Float8TrainingTensor):
            weight_fp8 = torchao_float8_cast()(weight_fp8, c.cast_config_weight.target_dtype, mm,
                                               gemm_input_role=GemmInputRole.WEIGHT)
        g8 = torchao_float8_cast()(grad.reshape(-1, grad.shape[-1]), c.cast_config_grad_output.target_dtype, mm,
                                   gemm_input_role=GemmInputRole.GRAD_OUTPUT)
        # torchao lays the row-major weight out column-major for _scaled_mm (a transient copy of N bytes)
        return torch.mm(g8, weight_fp8).reshape(*grad.shape[:-1], -1), None, None, None


def _frozen_class():
    from torchao.float8.float8_linear import Float8Linear

    class FrozenFloat8Linear(Float8Linear):
        """torchao's Float8Linear for a frozen weight: two FP8 matmuls, not three; the weight held in FP8 alone
        once `cache_weight` ran (model.fp8_weight_cache)."""

        def cache_weight(self) -> None:
            """Cast the frozen weight to FP8 once and keep only that: `weight` becomes the e4m3 data (same shape),
            `weight_scale` its tensorwise scale, and the bf16 weight is freed."""
            from torchao.float8.float8_training_tensor import GemmInputRole

            from lightning_moe.upstream import torchao_float8_cast

            with torch.no_grad():
                w8 = torchao_float8_cast()(self.weight, self.config.cast_config_weight.target_dtype,
                                           self.linear_mm_config, gemm_input_role=GemmInputRole.WEIGHT)
            self.weight_dtype = self.weight.dtype  # the dtype the matmuls return, as with the bf16 weight
            self.weight = torch.nn.Parameter(w8._data, requires_grad=False)
            self.register_buffer("weight_scale", w8._scale)

        def cached_weight(self):
            if "weight_scale" not in self._buffers:
                return None
            from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole

            return Float8TrainingTensor(self.weight.detach(), self.weight_scale, self.weight_dtype,
                                        self.linear_mm_config, GemmInputRole.WEIGHT)

        def _apply(self, fn, recurse=True):
            # Module.to(dtype) casts every floating tensor, FP8 included: the e4m3 data read as bf16 without its
            # scale would be a wrong weight, silently (Lightning's bf16-true does that; bf16-mixed does not)
            kept = self.weight.dtype
            out = super()._apply(fn, recurse)
            if "weight_scale" in self._buffers and self.weight.dtype != kept:
                raise RuntimeError(f"a frozen FP8 base weight was cast to {self.weight.dtype}: with "
                                   "model.fp8_weight_cache=true use trainer.precision=bf16-mixed, which casts no module")
            return out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled():  # as Float8Linear: the output in autocast's dtype
                x = x.to(torch.get_autocast_gpu_dtype())
            out = _FrozenWeightMatmul.apply(x, self.weight, self.cached_weight(), self)
            return out if self.bias is None else out + self.bias.to(out.dtype)

    return FrozenFloat8Linear


def fp8_config(grad_dtype: str = "e5m2", emulate: bool = False):
    """torchao's tensorwise float8 recipe, with the output gradients in `grad_dtype` (model.fp8_grad_dtype)."""
    from torchao.float8 import CastConfig, Float8LinearConfig
    from torchao.float8.config import e4m3_dtype, e5m2_dtype

    grads = CastConfig(target_dtype={"e5m2": e5m2_dtype, "e4m3": e4m3_dtype}[grad_dtype])
    return Float8LinearConfig(cast_config_grad_output=grads, emulate=emulate)


def convert_frozen_base_to_fp8(model: torch.nn.Module, cache_weights: bool = False, grad_dtype: str = "e5m2",
                               emulate: bool = False) -> int:
    """Swap every frozen LoRA base linear for an FP8 one, in place; returns how many. `emulate`: torchao's
    high-precision emulation of the FP8 matmuls, which runs on a CPU (tests)."""
    from torchao.float8 import convert_to_float8_training

    frozen = _frozen_class()
    convert_to_float8_training(model, module_filter_fn=frozen_lora_base, config=fp8_config(grad_dtype, emulate))
    count = 0
    for mod in model.modules():
        if type(mod).__name__ == "Float8Linear":
            # the converted module, with no state of its own beyond Float8Linear's: give it the frozen forward
            mod.__class__ = frozen
            if cache_weights:
                mod.cache_weight()
            count += 1
    return count
