"""fp8.py: the frozen teachers' Linear layers in FP8 (e4m3), opt-in for stage 1.

    python train_stage1.py --teacher_dtype=float8             # (float8_tensor: one activation scale per tensor)
    python bench.py --stage=1 --teacher_dtype=float8          # clips/s, and what FP8 changes in the targets

What it buys. The two frozen teachers' forward is most of a stage-1 step (855 ms of 1007 ms for the 1B recipe on an
H100, README's speed section), and almost all of it is nn.Linear. Tensor cores of compute capability 8.9 and up (Ada,
Hopper: H100, H200) multiply e4m3 twice as fast as bf16, and an e4m3 weight takes half the memory of a bf16 one; the
weights are frozen, so they are quantised once. On a CPU or an older GPU the same quantised numbers are multiplied in
fp32: a run there shows what FP8 does to the targets and to training, not its speed. Only nn.Linear is replaced:
attention, norms, the patch embedding and the residual stream stay in the teachers' dtype.

How e4m3 scaling works. e4m3 has 4 exponent bits and 3 mantissa bits (a rounding error of at most 2^-4 relative) and
its largest finite value is 448. A tensor is stored as q (e4m3) and an fp32 scale, x ~ q * scale with
scale = amax / 448, so a row's largest |value| lands on 448 and the others keep their relative precision down to
e4m3's smallest normal (2^-6; below it the subnormals lose bits):
  weights      one scale per output channel (a row of the (N, K) weight), computed once at conversion;
  activations  one scale per token (a row of the (M, K) input), at every call; with float8_tensor one for the
               whole tensor (a token far smaller than the largest then drifts into the subnormals).
Then y = (q_x @ q_w^T) * s_x * s_w + b: a product of two e4m3 values is exact in fp32, so the only errors are the two
roundings.

How its fidelity is measured. tests/test_fp8.py pins the quantisation (scales, round-to-nearest-even, saturation at
448, zero rows) against a search over all e4m3 values and Float8Linear against its dequantised matmul;
`pytest tests/test_fp8.py -k toy_teachers_in_float8 -s` prints the cosine of the shipped toy teachers' FP8 targets
to their float ones and the change of the stage-1 loss (README, "FP8 teachers"); bench.py reports the same for its
batch (bench.float8_fidelity), and tests/test_gpu.py checks torch._scaled_mm against the fp32 reference on a GPU.

  to_e4m3, quantize_e4m3   the saturating cast; per-row (or per-tensor) scaling
  Float8Linear             a frozen nn.Linear in e4m3: torch._scaled_mm where fp8_matmul_available, else fp32
  to_float8                every nn.Linear of a network swapped in place (shapes _scaled_mm cannot take are named)
  float8_teachers          both teachers: the one call train_stage1.py and bench.py make
"""
import torch
import torch.nn as nn

from teachers import freeze

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max            # 448: 1.75 * 2^8, the largest finite e4m3


def to_e4m3(y):
    """Saturating cast to e4m3: clamp to +-448 first (whether an out-of-range cast saturates or gives NaN
    is up to the backend; e4m3fn has no infinity), then round to nearest (even)."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_e4m3(x, dim=-1):
    """x (..., K) -> (q e4m3 of x's shape, scale fp32 with `dim` kept as size 1), x ~ q.float() * scale.
    dim=-1: one scale per row (a weight's output channel, an activation's token); dim=None: one for the
    tensor (all dims kept as 1). A row of zeros gets scale 1 (q = 0; no 0/0 NaN)."""
    x = x.float()
    dims = tuple(range(x.ndim)) if dim is None else dim
    amax = x.abs().amax(dim=dims, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return to_e4m3(x / scale), scale


def fp8_matmul_available(device):
    """torch._scaled_mm's e4m3 kernels need FP8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(nn.Module):
    """A frozen nn.Linear in FP8: y = (q_x @ q_w^T) * s_x * s_w + b, output in x's dtype (the autocast
    dtype under autocast, as nn.Linear's).

    backend "scaled_mm": torch._scaled_mm, row-wise scaling. It takes A (M, K) e4m3 row-major, B (K, N) e4m3
    column-major (our (N, K) weight, transposed: a view), scale_a (M, 1) and scale_b (1, N) fp32 contiguous,
    K and N multiples of 16, and on CUDA a bf16 output (torch/_meta_registrations.py, _check_scaled_mm_sizes);
    the bias is added after. "reference": the same quantised numbers in float32 (an e4m3 x e4m3 product is
    exact in fp32), for CPUs and GPUs without FP8. "auto": scaled_mm where fp8_matmul_available, else
    reference; re-decided whenever the module moves to another device."""

    def __init__(self, linear: nn.Linear, per_token=True, backend="auto"):
        super().__init__()
        if backend not in ("auto", "scaled_mm", "reference"):
            raise ValueError(f"backend must be auto, scaled_mm or reference, got {backend!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.per_token, self.requested = per_token, backend
        w, s = quantize_e4m3(linear.weight.detach(), dim=1)                   # (N, K) e4m3, (N, 1) fp32
        self.weight_fp8 = nn.Parameter(w, requires_grad=False)                # a Parameter: count_params sees it
        self.register_buffer("weight_scale", s.t().contiguous())              # (1, N): scale_b's layout
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.backend = self._pick_backend()

    def _pick_backend(self):
        if self.requested != "auto":
            return self.requested
        return "scaled_mm" if fp8_matmul_available(self.weight_fp8.device) else "reference"

    def _apply(self, fn, recurse=True):
        """nn.Module.to(dtype) casts every floating-point tensor, and e4m3 is one to torch: the e4m3 weight
        and its fp32 scales follow the device only (the bias follows the dtype too, as any parameter)."""
        device = fn(torch.empty(0, device=self.weight_fp8.device)).device
        w, s = self._parameters.pop("weight_fp8"), self._buffers.pop("weight_scale")
        super()._apply(fn, recurse)
        self.weight_fp8 = nn.Parameter(w.data.to(device), requires_grad=False)
        self.register_buffer("weight_scale", s.to(device))
        self.backend = self._pick_backend()
        return self

    def forward(self, x):                                               # x: (..., K) -> (..., N)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features)                            # (M, K): every token a row
        xq, xs = quantize_e4m3(x2, dim=-1 if self.per_token else None)  # (M, K) e4m3, (M, 1) or (1, 1) fp32
        xq, xs = xq.contiguous(), xs.expand(x2.shape[0], 1).contiguous()  # per tensor: the one scale on every row
        if self.backend == "scaled_mm":
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        else:
            with torch.autocast(dev, enabled=False):                    # fp32, even inside bf16 autocast
                y = (xq.float() @ self.weight_fp8.float().t()) * xs * self.weight_scale
        y = y.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations per {'token' if self.per_token else 'tensor'}, backend={self.backend}")


def to_float8(net, per_token=True, backend="auto"):
    """Replace, in place, every nn.Linear of a frozen teacher by a frozen Float8Linear (call it after the
    teacher is on its device and dtype). Skipped, with the reason: in/out features not multiples of 16
    (_scaled_mm's kernels need them). Returns (converted names, {skipped name: why})."""
    converted, skipped = [], {}
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            if child.in_features % 16 or child.out_features % 16:
                skipped[full] = f"{child.in_features} -> {child.out_features} not multiples of 16"
            else:
                setattr(parent, name, freeze(Float8Linear(child, per_token, backend)))
                converted.append(full)
    return converted, skipped


def float8_teachers(teachers, per_token=True, backend="auto"):
    """Both teachers' Linears to FP8 (to_float8); returns one line saying what was converted, what was
    skipped (grouped by reason) and which matmul runs."""
    words = []
    for kind, net in (("clip", teachers.clip), ("mae", teachers.mae)):
        converted, skipped = to_float8(net, per_token, backend)
        reasons = {}
        for why in skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        words.append(f"{kind} {len(converted)}/{len(converted) + len(skipped)} Linears in e4m3"
                     + "".join(f", {n} skipped ({why})" for why, n in reasons.items()))
    mods = [m for net in (teachers.clip, teachers.mae) for m in net.modules() if isinstance(m, Float8Linear)]
    how = {m.backend for m in mods}
    return (f"float8 teachers: {'; '.join(words)}; activations per {'token' if per_token else 'tensor'}, matmul "
            f"{'/'.join(sorted(how)) or 'none'}" + (" (dequantised fp32 matmul: FP8's numbers, not its speed)"
                                                    if "reference" in how else ""))
