"""fp8.py: e4m3 quantisation and Float8Linear against float references, the FP8 teachers' targets and stage-1 loss
against the float ones (toy teachers, bench.py), and train_stage1.py's --teacher_dtype=float8."""
import pytest
import torch
import torch.nn.functional as F

from fp8 import E4M3_MAX, Float8Linear, float8_teachers, quantize_e4m3, to_e4m3, to_float8
from model import InternVideo2, count_params, vision_preset
from teachers import build_teachers


def _e4m3_nearest(y):
    """Round-to-nearest-even onto the e4m3 grid, by search: every finite e4m3 value (from its 256 bit patterns, the two
    NaNs dropped), the closest one, a tie to the even bit pattern (mantissa ending in 0). Saturates at +-448."""
    codes = torch.arange(256, dtype=torch.int32)
    grid = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    finite = ~grid.isnan()
    grid, codes = grid[finite], codes[finite]
    d = (y.clamp(-E4M3_MAX, E4M3_MAX)[..., None] - grid).abs()
    nearest = d == d.min(-1, keepdim=True).values
    score = (~nearest).int() * 2 + (codes & 1)                     # among the nearest, the even pattern first
    return grid[score.argmin(-1)].abs().copysign(y)                 # +-0 alike


def test_quantize_e4m3_against_a_float_reference():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 1.0])[:, None]
    x[4] = 0                                                        # a zero row
    x[5] = torch.logspace(-8, 2, 64) * torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)   # subnormals, underflow
    q, s = quantize_e4m3(x, dim=-1)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (6, 1)
    amax = x.abs().amax(1, keepdim=True)
    assert torch.equal(s[:4], amax[:4] / 448) and torch.equal(s[5:], amax[5:] / 448) and s[4].item() == 1.0
    assert torch.equal(q.float(), _e4m3_nearest(x / s)) and not q.float().isnan().any()
    assert torch.equal(q.float()[[0, 1, 2, 3, 5]].abs().amax(1), torch.full((5,), 448.0))   # each row's max on 448
    assert torch.all(q.float()[4] == 0)
    # the reference grid is the real one: ties go to even, as documented for IEEE-style rounding
    ties = torch.tensor([1.0625, 1.1875, 0.0029296875, 464.0, -1e5])   # 1+1/16, 1.125+1/16, 1.5*2^-9, past 448
    assert _e4m3_nearest(ties).tolist() == [1.0, 1.25, 0.00390625, 448.0, -448.0]
    # out of range saturates (no NaN): the clamp before the cast, whatever the backend's own cast would do
    big = torch.tensor([448.0001, 460.0, 1000.0, float("inf"), -1e9, -float("inf")])
    assert to_e4m3(big).float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0, -448.0]
    # per tensor: one scale, all dims kept
    q, s = quantize_e4m3(x, dim=None)
    assert s.shape == (1, 1) and torch.equal(s, x.abs().max().reshape(1, 1) / 448)
    assert torch.equal(q.float(), _e4m3_nearest(x / s))
    q, s = quantize_e4m3(torch.zeros(3, 16), dim=None)
    assert s.item() == 1.0 and torch.all(q.float() == 0)


@pytest.mark.parametrize("per_token", [True, False])
def test_float8_linear_equals_its_dequantised_reference_and_the_linear_within_fp8_error(per_token):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64) * torch.logspace(-1, 1, 5)[:, None]   # tokens of different sizes
    qw, sw = quantize_e4m3(lin.weight, dim=1)                         # written out: dequantise both, then multiply
    qx, sx = quantize_e4m3(x.reshape(15, 64), dim=-1 if per_token else None)
    ref = ((qx.float() * sx) @ (qw.float() * sw).t() + lin.bias).reshape(3, 5, 48)
    for backend in ("reference", "scaled_mm"):                       # torch's CPU _scaled_mm: the call's layout
        f8 = Float8Linear(lin, per_token=per_token, backend=backend)
        torch.testing.assert_close(f8(x), ref.detach(), rtol=1e-6, atol=1e-6)
    assert f8.weight_fp8.t().stride() == (1, 64) and f8.weight_scale.shape == (1, 48)   # B column-major, (1, N)
    y, exact = f8(x), lin(x).detach()
    rel = ((y - exact).norm(dim=-1) / (exact - lin.bias).norm(dim=-1)).max().item()
    assert 1e-3 < rel < 0.06, rel                                     # e4m3: 3 mantissa bits, a few % per token
    # output dtype: the input's, or the autocast dtype under autocast, as nn.Linear; a zero input gives the bias
    assert f8(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f8(x).dtype == torch.bfloat16
    torch.testing.assert_close(f8(torch.zeros(2, 64)), lin.bias.detach().expand(2, -1))
    # .to(dtype) casts the bias only: e4m3 weight and fp32 scales stay
    f8.to(torch.bfloat16)
    assert (f8.weight_fp8.dtype, f8.weight_scale.dtype, f8.bias.dtype) == (torch.float8_e4m3fn, torch.float32,
                                                                          torch.bfloat16)
    assert f8.backend == "scaled_mm" and Float8Linear(lin).backend == "reference"        # auto on a CPU: reference


def test_to_float8_converts_the_linears_and_names_what_it_skips():
    net = torch.nn.Sequential(torch.nn.Linear(96, 384), torch.nn.GELU(), torch.nn.Linear(384, 100))
    converted, skipped = to_float8(net)
    assert converted == ["0"] and skipped == {"2": "384 -> 100 not multiples of 16"}
    assert isinstance(net[0], Float8Linear) and isinstance(net[2], torch.nn.Linear)
    teachers = build_teachers("toy", "toy")
    n = count_params(teachers.clip) + count_params(teachers.mae)
    line = float8_teachers(teachers)
    assert "clip 20/20 Linears in e4m3" in line and "mae 16/16" in line
    assert "matmul reference" in line and count_params(teachers.clip) + count_params(teachers.mae) == n
    for net in (teachers.clip, teachers.mae):
        net.train()
        assert all(not m.training for m in net.modules()) and all(not p.requires_grad for p in net.parameters())
    assert isinstance(teachers.mae.blocks[0].mlp.fc1, Float8Linear)
    assert isinstance(teachers.clip.blocks[0].attn.qkv, Float8Linear)              # the fused qkv too


@pytest.mark.parametrize("per_token", [True, False])
def test_toy_teachers_in_float8_keep_their_targets(toyworld, per_token, capsys):
    """The shipped toy teachers on 8 ToyWorld clips: every target's cosine with the float teachers' (per token), and
    the stage-1 loss of one random student on the batch (the mask follows each teacher's attention)."""
    from checkpoints import TOYS
    from data import VideoTextDataset, collate
    from losses import stage1_objective
    ds = VideoTextDataset(toyworld / "val.jsonl", 16, 32, train=False, noise_grid=(8, 16))
    batch = collate([ds[i] for i in range(8)])
    teachers = build_teachers("toy", "toy", TOYS / "toy_clip_teacher.pt", TOYS / "toy_mae_teacher.pt")
    torch.manual_seed(0)
    student = InternVideo2(vision_preset("toy"), with_heads=True).eval()
    with torch.no_grad():
        ref, ref_loss = teachers(batch["video"]), stage1_objective(student, teachers, batch, mask_ratio=0.5)[0]
        float8_teachers(teachers, per_token=per_token)
        out, loss = teachers(batch["video"]), stage1_objective(student, teachers, batch, mask_ratio=0.5)[0]
    cos = {k: F.cosine_similarity(out[k], ref[k], dim=-1) for k in ("clip", "clip_final", "mae")}
    rel = (loss / ref_loss - 1).item()
    with capsys.disabled():
        print(f"\ntoy teachers, float8 per {'token' if per_token else 'tensor'}: cosine mean / min "
              + ", ".join(f"{k} {c.mean():.6f} / {c.min():.6f}" for k, c in cos.items())
              + f"; stage-1 loss {loss:.6f} vs {ref_loss:.6f} ({rel:+.2e})")
    assert all(c.mean() >= 0.99 and c.min() >= 0.95 for c in cos.values()), cos
    assert (out["attn"] - ref["attn"]).abs().max() < 0.05 * ref["attn"].max() and abs(rel) < 1e-2


def test_bench_reports_float8_fidelity_on_cpu():
    import bench
    res = bench.main(["--stage=1", "--device=cpu", "--batch_size=2", "--steps=1", "--warmup=0", "--count_flops=False",
                      "--teacher_dtype=float8"])
    assert res["loss_finite"] and "matmul reference" in res["float8"] and res["teacher_dtype"] == "float8"
    assert min(res["fp8_target_cos"].values()) > 0.99 and abs(res["fp8_loss_rel_diff"]) < 1e-2
    assert "FP8 vs torch.float32 teachers" in bench.report(res)


def test_stage1_takes_teacher_dtype_float8():
    from common import ConfigError, parse_config
    from train_stage1 import Stage1Config
    assert parse_config(Stage1Config(), ["--teacher_dtype=float8_tensor"]).teacher_dtype == "float8_tensor"
    with pytest.raises(ConfigError, match="float8 or float8_tensor, got 'fp8'"):
        parse_config(Stage1Config(), ["--teacher_dtype=fp8"])
