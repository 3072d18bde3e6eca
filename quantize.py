"""Weight-only int8 and int4 quantization of any model of this repo, in plain PyTorch (as gpt-fast's quantize.py).

Decoding one token at batch 1 reads every weight once and does two FLOPs with each: it is bound by memory
bandwidth, so storing the weights in fewer bits makes it faster by about the ratio of bytes read.
  - "int8": per output channel, symmetric: w ~ q * scale, q in [-127, 127], scale = absmax(row) / 127;
  - "int4": groupwise (group_size inputs share a scale and a zero), asymmetric: w ~ (q - 8) * scale + zero,
    q in [0, 15] over each group's [min, max] (the format of PyTorch's int4 kernels and of gpt-fast);
  - every nn.Linear is replaced, the LM head too (head=True; a tied head becomes its own quantized copy and the
    embedding stays in full precision: a lookup reads one row a token); left as they are: embeddings, norms,
    deepseek's kv_b_proj (its absorbed decoding reads .weight itself), MoE routers (a rounding error there
    changes which experts run) and the stacked MoE experts (Parameters, not Linears);
  - the kernels: torch._weight_int8pack_mm (CPU), torch._weight_int4pack_mm_for_cpu (CPU) and
    torch._weight_int4pack_mm (CUDA) take bfloat16 activations: the input is cast to bf16 and the output back;
    on other devices and shapes, int8 is F.linear(x, q) * scale and int4 is dequantize + F.linear;
  - save_quantized / load_quantized: config.json, quantization.json and model.safetensors (no pickle).
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint_io
import errors

MODES = ("int8", "int4")
KEEP = ("kv_b_proj", "gate")   # Linears left in full precision (see the docstring); dense MLPs name theirs gate_proj


class Int8Linear(nn.Module):
    """y = x q^T * scale + bias; q (out, in) int8, scale (out,) in the layer's dtype (it follows model.to(dtype))."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach()
        scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127   # the rounding error is <= scale / 2 a weight
        self.register_buffer("q", torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(w.dtype))
        self.bias = linear.bias
        self._bf16 = None   # (scales, their bf16 copy for the kernel)

    @property
    def weight(self):
        """The dequantized weight (out, in): for code that reads .weight (init_cache reads its dtype and device)."""
        return self.q.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x):
        if x.device.type == "cpu":
            if self._bf16 is None or self._bf16[0] is not self.scales:
                self._bf16 = (self.scales, self.scales.to(torch.bfloat16))
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)).to(torch.bfloat16), self.q, self._bf16[1])
            y = y.view(*x.shape[:-1], -1).to(x.dtype)
        else:   # int8 to x's dtype costs one pass over q; the scale applies to the output, out values not out x in
            y = F.linear(x, self.q.to(x.dtype)) * self.scales.to(x.dtype)
        return y + self.bias if self.bias is not None else y


class Int4Linear(nn.Module):
    """Groupwise 4-bit weight: q (out, in / 2) uint8, two inputs a byte (even << 4 | odd); scales_and_zeros
    (in / group_size, out, 2). The kernels want their own packing of q per device: it is made on the first forward
    on a device and kept beside q (which is what save_quantized writes), 0.5 bytes a weight each."""

    def __init__(self, linear, group_size):
        super().__init__()
        w = linear.weight.detach()
        N, K = w.shape
        g = w.float().view(N, K // group_size, group_size)
        lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(w.dtype).float()   # rounded to the stored dtype first, so
        zero = (lo + 8 * scale).to(w.dtype).float()                     # that q is the best for the stored pair
        q = torch.round((g - zero) / scale + 8).clamp(0, 15).to(torch.uint8).view(N, K)
        self.register_buffer("q", q[:, ::2] << 4 | q[:, 1::2])
        self.register_buffer("scales_and_zeros", torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(w.dtype))
        self.bias, self.group_size = linear.bias, group_size
        self._packed = None   # (q, its kernel packing, scales_and_zeros in bf16)

    def unpacked(self):
        """q as (out, in) int32 in [0, 15]."""
        return torch.stack([self.q >> 4, self.q & 15], dim=-1).view(self.q.size(0), -1).to(torch.int32)

    @property
    def weight(self):
        N, K = self.q.size(0), 2 * self.q.size(1)
        scale, zero = self.scales_and_zeros.transpose(0, 1).unbind(-1)   # (out, in / group_size) each
        g = (self.unpacked().view(N, -1, self.group_size) - 8).to(scale.dtype)
        return (g * scale[..., None] + zero[..., None]).view(N, K)

    def _kernel(self, device):
        """The kernel's packed q and bf16 scales for this device, or None where no kernel takes this shape."""
        K = 2 * self.q.size(1)
        if self._packed is None or self._packed[0] is not self.q:
            if device.type == "cpu" and self.q.size(0) % 16 == 0:
                packed = torch._convert_weight_to_int4pack_for_cpu(self.unpacked(), 1)
            elif device.type == "cuda" and self.q.size(0) % 8 == 0 and K % 32 == 0:
                # inner_k_tiles: how many 16-wide k tiles the CUDA kernel reads at once; it must divide K / 16
                packed = torch._convert_weight_to_int4pack(self.q, next(t for t in (8, 4, 2) if K % (16 * t) == 0))
            else:
                packed = None
            self._packed = (self.q, packed, self.scales_and_zeros.to(torch.bfloat16))
        return None if self._packed[1] is None else self._packed[1:]

    def forward(self, x):
        kernel = self._kernel(x.device)
        if kernel is None:
            y = F.linear(x, self.weight.to(x.dtype))
        else:
            mm = torch._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch._weight_int4pack_mm
            x2 = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
            y = mm(x2, kernel[0], self.group_size, kernel[1]).view(*x.shape[:-1], -1).to(x.dtype)
        return y + self.bias if self.bias is not None else y


def quantize(model, mode, *, group_size=32, head=True):
    """Replace the model's nn.Linears in place by Int8Linear or Int4Linear and return it; model.quantization
    records how (kept: the Linears left in full precision; int8: those of int4 mode made int8). head: quantize
    the LM head too."""
    if mode not in MODES:
        raise errors.BadInput(f"quantization mode {mode!r}: expected one of {', '.join(MODES)}")
    if group_size not in (32, 64, 128, 256):
        raise errors.BadInput(f"group_size {group_size}: expected 32, 64, 128 or 256 (what the int4 kernels take)")
    kept, int8 = [], []
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        if name.rpartition(".")[2] in KEEP or (name == "lm_head" and not head):
            kept.append(name)
            continue
        # int4: a shape the int4 kernels do not take (out % 16, in % group_size; GPT-2's head, 50257 rows) is int8,
        # which is faster than dequantizing it every call
        int4 = mode == "int4" and not (linear.out_features % 16 or linear.in_features % group_size)
        int8.extend([name] if mode == "int4" and not int4 else [])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int4Linear(linear, group_size) if int4 else Int8Linear(linear))
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None, "head": head,
                          "kept": kept, "int8": int8}
    return model


# -----------------------------------------------------------------------------------------------------------
# Save and load: config.json (the base model's), quantization.json (quantize's arguments, what stayed in full
# precision, and the tied names), model.safetensors (every parameter and buffer by name, a tied one once)


def save_quantized(model, directory):
    """Write a quantized model to directory, as load_quantized reads it."""
    directory, tensors, tied, seen = Path(directory), {}, {}, {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t.data_ptr() in seen and t.nbytes:
            tied[name] = seen[t.data_ptr()]   # e.g. lm_head.weight -> wte.weight, when the head stayed unquantized
        else:
            seen[t.data_ptr()], tensors[name] = name, t
    checkpoint_io.save_safetensors(tensors, directory)
    checkpoint_io.write_json(directory / "config.json", model.config.to_hf())
    q = model.quantization
    checkpoint_io.write_json(directory / "quantization.json", {**q, "tied": tied})


def load_quantized(module, directory, *, device=None):
    """The model of module (gpt2, llama3, ...) that save_quantized wrote to directory, quantized as it was."""
    directory = Path(directory)
    config = checkpoint_io.read_config(directory / "config.json", module.Config.from_hf)
    q = checkpoint_io.read_json(directory / "quantization.json")
    with torch.device("meta"):   # shapes only: every tensor is replaced by the file's
        model = quantize(module.Model(config), q["mode"], group_size=q["group_size"] or 32, head=q["head"])
    state, tied = checkpoint_io.load_safetensors(directory), q["tied"]
    wanted = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
        n for n, _ in model.named_buffers(remove_duplicate=False)}
    if missing := sorted(wanted - state.keys() - tied.keys()) or sorted(state.keys() - wanted):
        raise errors.BadInput(f"{directory}: tensor {missing[0]!r} is not the quantized {module.__name__} model's")
    for name in [*state, *tied]:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, attr)
        t = state[name] if name in state else getattr(model.get_submodule(tied[name].rpartition(".")[0]),
                                                      tied[name].rpartition(".")[2])
        if old.shape != t.shape or old.dtype != t.dtype:
            raise errors.BadInput(f"{directory}: {name} is {t.dtype} {tuple(t.shape)}, the model's "
                                  f"{old.dtype} {tuple(old.shape)}")
        if attr in owner._parameters:
            owner._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[attr] = t
    return model.to(device).eval() if device is not None else model.eval()
