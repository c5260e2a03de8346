"""GPU-only checks (skipped without CUDA; scripts/gpu_check.sh runs them): every network's bf16
forward and backward through the real losses, regional compilation equal to eager, a one-GPU
torchrun DDP run of stage 1, and FP8 teachers' torch._scaled_mm path equal to their reference path."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["--stage=1"], ["--stage=2", "--audio=toy"], ["--stage=3", "--substage=1"],
                                  ["--stage=3", "--substage=2", "--llm_len=64"],
                                  ["--stage=3", "--substage=3", "--llm_len=64"]])
def test_every_network_trains_in_bf16_on_cuda(args):
    res = bench.main([*args, "--device=cuda", "--batch_size=4", "--steps=2", "--warmup=1", "--count_flops=False"])
    assert res["loss_finite"] and res["dtype"] == "torch.bfloat16"


def test_regional_compile_matches_eager():
    from common import compile_blocks
    from model import InternVideo2, vision_preset
    torch.manual_seed(0)
    net = InternVideo2(vision_preset("toy"), with_heads=True).cuda()
    video = torch.randn(4, 3, 8, 32, 32, device="cuda")
    visible = torch.arange(1 + 8 * 4, device="cuda").expand(4, -1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = net.forward_distill(video, visible)
        assert compile_blocks(net) == 4 + 2 + 2                                 # blocks + the two decoder lists
        out = net.forward_distill(video, visible)
    for k in ref:
        torch.testing.assert_close(out[k].float(), ref[k].float(), atol=3e-2, rtol=3e-2)
    sum(v.float().sum() for v in out.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())


def test_one_gpu_ddp_run_of_stage1(tmp_path):
    data = tmp_path / "frames"                        # JPEG frame folders: no soundfile needed
    bench.make_frame_folders(data, 16, size=64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train_stage1.py"), f"--data={data}", f"--out_dir={tmp_path / 'out'}", "--random_teachers",
           "--batch_size=8", "--max_steps=4", "--warmup_steps=1", "--eval=False", "--workers=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "ckpt.pt").exists() and "world 1 (DDP)" in (tmp_path / "out" / "log.txt").read_text()


@pytest.mark.parametrize("per_token", [True, False])
def test_float8_scaled_mm_equals_the_reference_path(per_token):
    """The e4m3 x e4m3 products are exact in fp32, so the two paths differ by accumulation order and the final
    bf16 rounding only. M: not a multiple of 16, the toy teachers' 2 * 8 * 17, and a full-size token count."""
    from fp8 import Float8Linear, fp8_matmul_available
    if not fp8_matmul_available("cuda"):
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    torch.manual_seed(0)
    for K, N in ((96, 384), (1408, 6144), (3200, 9600)):
        lin = torch.nn.Linear(K, N).cuda()
        fast, ref = Float8Linear(lin, per_token), Float8Linear(lin, per_token, backend="reference")
        assert fast.backend == "scaled_mm"
        for M in (5, 272, 8 * 257):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y, r = fast(x), ref(x)
            assert y.dtype == r.dtype == torch.bfloat16 and y.shape == (M, N)
            assert ((y.float() - r.float()).norm() / r.float().norm()).item() < 4e-3, (K, N, M)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                assert fast(x.float()).dtype == torch.bfloat16


@pytest.mark.parametrize("compile", [False, True])
def test_float8_teachers_bench_on_cuda(compile):
    """Stage 1 with FP8 teachers through bench.py (eager and regionally compiled): finite, and the fidelity
    figures it reports vs the same teachers in bf16."""
    from fp8 import fp8_matmul_available
    if not fp8_matmul_available("cuda"):
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    res = bench.main(["--stage=1", "--device=cuda", "--batch_size=4", "--steps=2", "--warmup=1", "--count_flops=False",
                      "--teacher_dtype=float8", *(["--compile"] if compile else [])])
    assert res["loss_finite"] and "matmul scaled_mm" in res["float8"]
    assert min(res["fp8_target_cos"].values()) > 0.99 and abs(res["fp8_loss_rel_diff"]) < 0.01
