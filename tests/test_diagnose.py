"""evaluate.diagnose and `python evaluate.py diagnose`: where each ToyWorld attribute lives along the stages; and the
shipped toy teachers, which must carry their knowledge in their tokens (the student distils tokens)."""
import json

import pytest
import torch

from conftest import assert_picture


@pytest.fixture(scope="module")
def toyworld_probe(tmp_path_factory):
    """A ToyWorld large enough for a linear probe to mean something (240 training, 80 held-out clips)."""
    from data import make_toyworld
    return make_toyworld(tmp_path_factory.mktemp("toyworld_probe"), n_train=240, n_val=80, seed=0, workers=1,
                         verbose=False)


def test_shipped_toy_teachers_carry_their_knowledge_in_their_tokens(toyworld_probe):
    """The image teacher's mean token knows shape and colour and not direction; the video teacher's knows direction
    and speed (linear probes, held-out clips; chance: shape 0.25, colour 0.17, direction 0.25, speed 0.5). The image
    teacher's shape in its tokens comes from the CLIP term on its mean token (pretrain_toys.pretrain_toy_teachers)."""
    from common import Runtime
    from evaluate import diagnose
    torch.manual_seed(0)
    rows = diagnose(toyworld_probe, Runtime(torch.device("cpu"), torch.float32), n_train=240, log=lambda m: None)["rows"]
    image, video = rows["image teacher: mean token"], rows["video teacher: mean token"]
    assert image["shape"] >= 0.75 and image["color"] >= 0.9 and image["direction"] <= 0.45, image
    assert video["direction"] >= 0.85 and video["speed"] >= 0.85, video
    assert rows["image teacher: pooled"]["shape"] >= 0.75, rows["image teacher: pooled"]


def test_diagnose_command_on_a_tiny_pipeline(toyworld, toy_pretrained, tmp_path):
    """Stage 1 -> 2 -> 3 for a few steps, then `evaluate.py diagnose` on the three checkpoints: every
    representation's row is in the table, its JSON and its picture, with accuracies in [0, 1]."""
    import evaluate
    import train_stage1
    import train_stage2
    import train_stage3
    from common import ConfigError
    common = [f"--data={toyworld}", "--batch_size=4", "--workers=0", "--eval=False"]
    train_stage1.main(common + [f"--out_dir={tmp_path / 's1'}", "--max_steps=2", "--warmup_steps=1"])
    train_stage2.main(common + [f"--out_dir={tmp_path / 's2'}", "--max_steps=2", "--num_frames=4",
                                f"--text_ckpt={toy_pretrained['bert']}", f"--init_from={tmp_path / 's1' / 'ckpt.pt'}"])
    train_stage3.main(common + [f"--out_dir={tmp_path / 's3'}", "--max_steps=(1,1,1)", "--num_frames=(4,4,4)",
                                "--max_llm_len=64", f"--qformer_bert={toy_pretrained['bert']}",
                                f"--llm_ckpt={toy_pretrained['llm']}", f"--init_from={tmp_path / 's2' / 'ckpt.pt'}"])
    out = tmp_path / "diagnosis.md"
    d = evaluate.main(["diagnose", f"--data={toyworld}", f"--stage1={tmp_path / 's1' / 'ckpt.pt'}",
                       f"--stage2={tmp_path / 's2' / 'ckpt.pt'}", f"--stage3={tmp_path / 's3' / 'ckpt.pt'}",
                       f"--out={out}", "--n_train=48"])
    expected = ["image teacher: pooled", "image teacher: mean token", "video teacher: mean token",
                "random-init student: pooled", "random-init student: mean token", "stage-1 student: pooled",
                "stage-1 student: mean token", "stage-1 student at 4 frames: mean token", "stage-2 video embedding",
                "stage-2 audio embedding", "stage-2 video: contrastive", "stage-2 video: matching head",
                "stage-2 text tower: cosine of the two captions", "stage-2 audio+video: contrastive",
                "stage-2 audio+video: matching head", "stage-2 zero-shot motion classes",
                "stage-3 video tokens (4 frames): mean", "stage-3 Q-Former queries: mean", "stage-3 answers"]
    assert list(d["rows"]) == expected
    for name, row in d["rows"].items():
        low = -1.0 if d["measure"][name].startswith("cosine") else 0.0
        assert row and all(low <= v <= 1.0 for v in row.values() if v is not None), (name, row)
    assert set(d["rows"]["stage-2 audio+video: matching head"]) == {"shape", "color", "size", "direction", "speed",
                                                                     "words"}
    table = out.read_text().splitlines()
    assert len(table) == 2 + len(expected) + 1 and all(f"| {name} |" in out.read_text() for name in expected)
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(d["rows"]))
    assert_picture(out.with_suffix(".png"))
    with pytest.raises(ConfigError, match="give at least one of --stage1"):
        evaluate.main(["diagnose", f"--data={toyworld}"])
    with pytest.raises(ConfigError, match="--stage2=.*nowhere.pt: no such file"):
        evaluate.main(["diagnose", f"--data={toyworld}", f"--stage2={tmp_path / 'nowhere.pt'}"])


def test_shipped_quick_start_models_load_as_their_stages(toyworld):
    """toys/quickstart_stage{1,2,3}.pt (the notebooks' models) are the three stages' checkpoints without optimizer
    state: each is recognised as its stage, its weights fit the model its config builds, and the chat answers."""
    import chat
    from checkpoints import TOYS, checkpoint_kind, stage3_model
    from common import load_checkpoint
    from model import InternVideo2, Stage2Model, VisionConfig
    cks = {k: load_checkpoint(TOYS / f"quickstart_stage{k}.pt") for k in (1, 2, 3)}
    for k, ck in cks.items():
        assert checkpoint_kind(ck) == f"stage-{k} checkpoint" and "optimizer" not in ck, k
    InternVideo2(VisionConfig.from_saved(cks[1]["model_config"]), with_heads=True).load_state_dict(cks[1]["model"])
    Stage2Model.from_config(cks[2]["model_config"]).load_state_dict(cks[2]["model"])
    stage3_model(cks[3], torch.device("cpu"))
    answer = chat.main([f"--ckpt={TOYS / 'quickstart_stage3.pt'}", f"--video={toyworld / 'videos' / 'val_00000.webp'}",
                        "--question=which way is the object moving?", "--max_new_tokens=3"])
    assert answer in ("left", "right", "up", "down"), answer
