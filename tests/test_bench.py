"""bench.py on the CPU (toy presets, every stage, the loader) and the FLOP counter behind its MFU,
checked on the meta device against the per-clip FLOPs of the official stage-1 networks."""
import pytest
import torch

import bench


@pytest.mark.parametrize("stage,extra", [("1", []), ("2", ["--audio=toy"]), ("3", ["--substage=1"]),
                                         ("3", ["--substage=3", "--llm_len=48"])])
def test_bench_runs_every_stage_on_cpu(stage, extra, tmp_path):
    out = tmp_path / "bench.jsonl"
    res = bench.main([f"--stage={stage}", "--batch_size=2", "--steps=2", "--warmup=1", "--device=cpu",
                      f"--out={out}", *extra])
    assert res["loss_finite"] and res["step_s"] > 0 and res["clips_per_s"] > 0
    assert res["tflops_per_clip"] > 0 and res["mfu"] is None                 # no peak known for a CPU
    assert "optimizer" in res["parts_s"] and out.read_text().count("\n") == 1
    if stage == "1":
        assert 0 < res["parts_s"]["teachers forward"] < res["step_s"]
        assert 0 < res["tflops_per_clip_parts"]["teachers forward"] < res["tflops_per_clip"]


def test_bench_loader_on_frame_folders(tmp_path):
    res = bench.main(["--stage=loader", f"--data={tmp_path / 'frames'}", "--make_frames=6", "--img_size=64",
                      "--batch_size=2", "--loader_batches=2", "--workers=0,1"])
    assert set(res["clips_per_s"]) == {0, 1} and all(v > 0 for v in res["clips_per_s"].values())
    from data import VideoTextDataset                      # the synthetic frame folders are the real layout
    ds = VideoTextDataset(tmp_path / "frames" / "train.jsonl", 8, 64, train=True, cache=False)
    assert res["clips"] == len(ds) == 6 and ds[0]["video"].shape == (3, 8, 64, 64)


def test_bench_decode_compares_decoders_on_one_file(tmp_path):
    """--stage=decode on a small mp4: each decoder in its own process gives clips/s and its peak memory; one that is
    not installed (or unknown) is reported in one line instead of failing the run."""
    pytest.importorskip("av")
    from data import index_clip, write_video
    video = write_video(tmp_path / "v.mp4", index_clip(60, 96, 128), options={"g": "15"})
    res = bench.main(["--stage=decode", f"--video={video}", "--decode_clips=2", "--img_size=48",
                      "--decoders=ours,whole_file,nosuch"])
    for name in ("ours", "whole_file"):
        assert res["decoders"][name]["clips_per_s"] > 0 and res["decoders"][name]["peak_mib"] >= 0, res
    assert "unknown decoder" in res["decoders"]["nosuch"]["error"]
    assert "not run" in bench.report(res)


def test_flop_counts_match_the_official_stage1_networks():
    """Per clip (README anchors, measured on the official code): InternViT-6B forward 24.6 T,
    VideoMAEv2-g forward 5.1 T, 1B student with heads forward + backward at 417 tokens 2.75 T."""
    from model import InternVideo2, vision_preset
    from teachers import build_teachers
    with torch.device("meta"):
        teachers = build_teachers("internvit-6b", "videomae-g")
        student = InternVideo2(vision_preset("1B"), with_heads=True)
        video = torch.randn(1, 3, 16, 224, 224)
        clip = bench.count_flops(lambda: teachers.clip(video[:, :, ::2])) / 1e12
        mae = bench.count_flops(lambda: teachers.mae(video)) / 1e12
        visible = torch.arange(1 + 8 * (256 - int(0.8 * 256)))[None]                 # 417 tokens
        stu = bench.count_flops(lambda: sum(v.float().sum() for v in student.forward_distill(
            video[:, :, ::2], visible).values()).backward()) / 1e12
    assert clip == pytest.approx(24.6, rel=0.02) and mae == pytest.approx(5.1, rel=0.02)
    assert stu == pytest.approx(2.75, rel=0.02)


def test_nothing_imports_a_stage_script():
    """The house's arrows point down: bench.py, evaluate.py and every library module reach the
    stage objectives through losses.py, never through a training script (lazy imports included)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    scripts = {"train_stage1", "train_stage2", "train_stage3", "chat"}
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not scripts & {n.split(".")[0] for n in names if n}, f"{path.name} imports {names}"
