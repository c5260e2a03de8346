"""`evaluate.py features` and `evaluate.py probe`: the frozen features of any stage's checkpoint on any JSONL, and
linear / attentive probes on any label field (ToyWorld's attributes copied into a `label` field here)."""
import json

import numpy as np
import pytest
import torch

from checkpoints import TOYS
from common import ConfigError, load_checkpoint
from data import DataError, VideoTextDataset, WordPieceTokenizer, collate
import evaluate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models and L-BFGS on 48 clips: a second thread only adds waiting (several times slower on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_ckpts(toyworld, tmp_path_factory):
    """A 2-step stage-1 run and a 2-step stage-2 run from it (their layout, not their skill)."""
    import train_stage1
    import train_stage2
    out = tmp_path_factory.mktemp("features_runs")
    common = [f"--data={toyworld}", "--batch_size=4", "--workers=0", "--eval=False"]
    train_stage1.main(common + [f"--out_dir={out / 's1'}", "--max_steps=2", "--warmup_steps=1",
                                "--random_teachers=True"])
    train_stage2.main(common + [f"--out_dir={out / 's2'}", "--max_steps=2", "--num_frames=4", "--random_text=True",
                                f"--init_from={out / 's1' / 'ckpt.pt'}"])
    return {1: out / "s1" / "ckpt.pt", 2: out / "s2" / "ckpt.pt"}


def _labelled(toyworld, folder, label=lambda r: r["attrs"]["color"], splits=("train", "val")):
    """Copies of ToyWorld's JSONL files whose lines carry label(record) in a `label` field (videos by absolute path)."""
    folder.mkdir(exist_ok=True)
    for s in splits:
        recs = [json.loads(line) for line in open(toyworld / f"{s}.jsonl")]
        (folder / f"{s}.jsonl").write_text("".join(json.dumps({"id": r["id"], "video": str(toyworld / r["video"]),
                                                                "label": label(r)}) + "\n" for r in recs))
    return folder


def _clips(jsonl, frames):
    """Every clip of a JSONL as evaluation reads it: (N, 3, T, 32, 32), middle frame of each segment."""
    ds = VideoTextDataset(jsonl, frames, 32, train=False)
    return collate([ds[i] for i in range(len(ds))]), ds.records


@torch.no_grad()
def test_features_equal_each_stages_own_encode_functions(toyworld, tiny_ckpts, tmp_path):
    """Stage 1: the student's pooled vector; stage 2: encode_video's and encode_text's embeddings (the caption's,
    the checkpoint's tokenizer and length); stage 3: its encoder's pooled vector; ids: the `id` field, else the line."""
    from checkpoints import stage3_model
    from model import InternVideo2, Stage2Model, VisionConfig

    ck = load_checkpoint(tiny_ckpts[1])
    student = InternVideo2(VisionConfig.from_saved(ck["model_config"]), with_heads=True)
    student.load_state_dict(ck["model"])
    batch, recs = _clips(toyworld / "val.jsonl", student.cfg.num_frames)
    evaluate.main(["features", f"--ckpt={tiny_ckpts[1]}", f"--data={toyworld}", f"--out={tmp_path / 's1.npz'}",
                   "--batch_size=5"])                                          # 16 clips: batches of 5, 5, 5, 1
    f = np.load(tmp_path / "s1.npz")
    assert sorted(f.files) == ["ids", "video"] and list(f["ids"]) == [r["id"] for r in recs]
    torch.testing.assert_close(torch.from_numpy(f["video"]), student.eval()(batch["video"]), rtol=1e-4, atol=1e-5)

    ck = load_checkpoint(tiny_ckpts[2])
    model = Stage2Model.from_config(ck["model_config"])
    model.load_state_dict(ck["model"])
    model.eval()
    batch, recs = _clips(toyworld / "val.jsonl", model.vision_encoder.cfg.num_frames)
    out = evaluate.main(["features", f"--ckpt={tiny_ckpts[2]}", f"--data={toyworld / 'val.jsonl'}"])
    f = np.load(tiny_ckpts[2].parent / f"features_{toyworld.name}_val.npz")           # default: beside the ckpt
    assert sorted(f.files) == ["ids", "text", "video"] and all((f[k] == out[k]).all() for k in f.files)
    torch.testing.assert_close(torch.from_numpy(f["video"]), model.encode_video(batch["video"])[1], rtol=1e-4,
                               atol=1e-5)
    tok = WordPieceTokenizer(toyworld / "vocab.txt")
    ids, mask = tok.encode([r["caption"] for r in recs], ck["config"]["max_text_len"])
    torch.testing.assert_close(torch.from_numpy(f["text"]), model.encode_text(ids, mask)[1], rtol=1e-4, atol=1e-5)

    no_ids = tmp_path / "no_ids.jsonl"                                  # the line number stands in for an id
    no_ids.write_text("".join(json.dumps({"video": str(toyworld / r["video"])}) + "\n" for r in recs[:3]))
    ck = load_checkpoint(TOYS / "quickstart_stage3.pt")
    enc = stage3_model(ck, torch.device("cpu")).vision_encoder
    batch, _ = _clips(no_ids, enc.cfg.num_frames)
    out = evaluate.main(["features", f"--ckpt={TOYS / 'quickstart_stage3.pt'}", f"--data={no_ids}",
                         f"--out={tmp_path / 's3.npz'}"])
    assert list(out["ids"]) == ["1", "2", "3"] and "text" not in out
    torch.testing.assert_close(torch.from_numpy(out["video"]), enc(batch["video"]), rtol=1e-4, atol=1e-5)

    with pytest.raises(ConfigError, match="is a teacher; features and probes read a stage-1, 2 or 3"):
        evaluate.main(["features", f"--ckpt={TOYS / 'toy_clip_teacher.pt'}", f"--data={toyworld}"])
    with pytest.raises(ConfigError, match=r"no train.jsonl \(or train.json\) there"):
        evaluate.main(["features", f"--ckpt={tiny_ckpts[1]}", f"--data={tmp_path}", "--split=train"])


def test_probes_read_colour_from_a_label_field(toyworld, tmp_path):
    """The quick start's stage-1 student (toys/quickstart_stage1.pt) knows colour: a linear probe on its pooled vector
    reads colour from a `label` field well above chance (1/6), the attentive probe runs on its tokens, each with an
    accuracy per held-out class, printed and written to JSON."""
    data = _labelled(toyworld, tmp_path / "colour")
    out = evaluate.main(["probe", f"--ckpt={TOYS / 'quickstart_stage1.pt'}", f"--train={data / 'train.jsonl'}",
                         f"--val={data / 'val.jsonl'}", "--probe_steps=30", f"--out={tmp_path / 'probe.json'}"])
    val = [json.loads(line)["label"] for line in open(data / "val.jsonl")]
    assert out["classes"] == sorted({json.loads(line)["label"] for line in open(data / "train.jsonl")})
    assert out["chance"] == 1 / 6 and out["linear"]["top1"] >= 0.75, out["linear"]
    for kind in ("linear", "attentive"):
        assert set(out[kind]["per_class"]) == set(val) and 0 <= out[kind]["top1"] <= 1, out[kind]
        assert all(0 <= v <= 1 for v in out[kind]["per_class"].values())
    assert json.loads((tmp_path / "probe.json").read_text()) == json.loads(json.dumps(out))


def test_seeded_split_and_integer_labels(toyworld, tiny_ckpts, tmp_path):
    """One JSONL, a seeded 25% held out: the same seed gives the same split, another seed another; integer labels
    are classes in numeric order; a stage-2 checkpoint probes its contrastive video embedding."""
    from data import ATTRIBUTES
    assert evaluate.seeded_split(64, 0.25, 0) == evaluate.seeded_split(64, 0.25, 0) != evaluate.seeded_split(64, 0.25, 1)
    train, val = evaluate.seeded_split(64, 0.25, 0)
    assert len(val) == 16 and sorted(train + val) == list(range(64)) and train == sorted(train) and val == sorted(val)
    with pytest.raises(ConfigError, match="--val_fraction=1.0"):
        evaluate.seeded_split(64, 1.0, 0)

    data = _labelled(toyworld, tmp_path / "sizes", label=lambda r: ATTRIBUTES["size"].index(r["attrs"]["size"]))
    one = tmp_path / "one.jsonl"
    one.write_text((data / "train.jsonl").read_text() + (data / "val.jsonl").read_text())
    out = evaluate.main(["probe", f"--ckpt={tiny_ckpts[2]}", f"--data={one}", "--val_fraction=0.25", "--seed=3",
                         "--probe=linear"])
    assert (out["n_train"], out["n_val"], out["seed"], out["classes"]) == (48, 16, 3, ["0", "1"])
    assert "attentive" not in out and set(out["linear"]["per_class"]) <= {"0", "1"}
    saved = tiny_ckpts[2].parent / f"probe_label_{tmp_path.name}_one.json"              # default: beside the ckpt
    assert json.loads(saved.read_text())["linear"] == out["linear"]


def test_probe_errors_are_one_line(toyworld, tiny_ckpts, tmp_path):
    """A held-out label never seen in training, a line without the label, a half-given split: named, before any
    feature is computed."""
    data = _labelled(toyworld, tmp_path / "unseen")
    lines = (data / "val.jsonl").read_text().splitlines()
    (data / "val.jsonl").write_text("\n".join([json.dumps({**json.loads(lines[0]), "label": "mauve"})] + lines[1:]))
    ckpt = f"--ckpt={tiny_ckpts[1]}"
    with pytest.raises(DataError, match=r"val.jsonl: label 'mauve' is not among the training labels \(6: 'blue'"):
        evaluate.main(["probe", ckpt, f"--data={data}"])
    (data / "val.jsonl").write_text("\n".join(lines[:2] + [json.dumps({"video": json.loads(lines[2])["video"]})]))
    with pytest.raises(DataError, match=r"val.jsonl:3: the label field 'label' must be a string or an int, it has none"):
        evaluate.main(["probe", ckpt, f"--data={data}"])
    with pytest.raises(ConfigError, match="give --train and --val together"):
        evaluate.main(["probe", ckpt, f"--train={data / 'train.jsonl'}"])


@torch.no_grad()
def test_features_of_a_released_stage1_module(toyworld, tmp_path):
    """The official pre-training module (flat official names, wrapped in `module` as DeepSpeed saves it): its
    architecture read from its shapes, its features the encoder's own pooled vectors."""
    from model import InternVideo2, vision_preset
    torch.manual_seed(5)
    src = InternVideo2(vision_preset("toy"), with_heads=True).eval()
    torch.save({"module": src.state_dict()}, tmp_path / "official.pth")
    out = evaluate.main(["features", f"--ckpt={tmp_path / 'official.pth'}", f"--data={toyworld / 'val.jsonl'}",
                         f"--out={tmp_path / 'f.npz'}", "--batch_size=16"])
    batch, _ = _clips(toyworld / "val.jsonl", src.cfg.num_frames)
    np.testing.assert_allclose(out["video"], src(batch["video"]).numpy(), rtol=1e-4, atol=1e-5)
