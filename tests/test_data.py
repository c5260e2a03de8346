"""data.py: ToyWorld, the reader and its errors, frame sampling, the resumable sampler."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, StepSampler, VideoTextDataset, collate, frame_indices, load_jsonl, make_toyworld, read_frames


def test_toyworld_is_deterministic_and_in_the_real_format(toyworld, tmp_path):
    again = make_toyworld(tmp_path / "again", n_train=48, n_val=16, seed=0, workers=1, verbose=False)
    for split in ("train", "val"):
        assert (toyworld / f"{split}.jsonl").read_text() == (again / f"{split}.jsonl").read_text()
    rec = json.loads((toyworld / "val.jsonl").read_text().splitlines()[3])
    assert {"id", "video", "audio", "caption", "audio_caption", "asr", "avs_caption", "qa"} <= set(rec)
    a = read_frames(toyworld / rec["video"], lambda n: range(n))
    b = read_frames(again / rec["video"], lambda n: range(n))
    assert a.shape == (16, 32, 32, 3) and np.array_equal(a, b)
    assert rec["attrs"]["color"] in rec["caption"] and rec["asr"] in rec["avs_caption"]


def test_frame_folder_gif_and_webp_read_the_same_frames(tmp_path):
    rng = np.random.default_rng(0)
    frames = (rng.random((5, 12, 12, 3)) > 0.5).astype(np.uint8) * 255   # 2 colours: GIF is lossless too
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(tmp_path / "v.webp", save_all=True, append_images=ims[1:], lossless=True)
    ims[0].save(tmp_path / "v.gif", save_all=True, append_images=ims[1:], disposal=1)
    (tmp_path / "frames").mkdir()
    for i, im in enumerate(ims):
        im.save(tmp_path / "frames" / f"{i:03d}.png")
    for src in ("v.webp", "v.gif", "frames"):
        got = read_frames(tmp_path / src, lambda n: [0, 2, 4])
        assert np.array_equal(got, frames[[0, 2, 4]]), src


def test_frame_indices_sample_one_frame_per_segment():
    assert frame_indices(16, 4, train=False) == [1, 5, 9, 13]           # segment middles
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = frame_indices(30, 8, train=True, rng=rng)
        for s, i in enumerate(idx):
            assert s * 30 // 8 <= i < (s + 1) * 30 // 8
    assert frame_indices(3, 8, train=False) == [0, 0, 0, 1, 1, 1, 2, 2]  # short videos repeat frames


def _sample_file(tmp_path, toyworld, lines):
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    shutil.copytree(toyworld / "videos", tmp_path / "videos", dirs_exist_ok=True)
    return path


def test_bad_inputs_name_the_file_and_line(tmp_path, toyworld):
    good = json.dumps({"id": "ok", "video": "videos/train_00000.webp", "caption": "x"})
    (tmp_path / "corrupt.webp").write_bytes(b"not an image at all")
    path = _sample_file(tmp_path, toyworld, [good, "{not json", good])
    with pytest.raises(DataError, match=r"s\.jsonl:2: malformed"):
        load_jsonl(path)
    path = _sample_file(tmp_path, toyworld, [good, json.dumps({"video": "corrupt.webp"}),
                                              json.dumps({"video": "missing.webp"}), json.dumps({"caption": "no video"})])
    with pytest.raises(DataError, match=r"s\.jsonl:4: malformed.*video"):
        VideoTextDataset(path, 4, 32, train=False)
    ds = VideoTextDataset(path, 4, 32, train=False, skip_bad=True)
    assert ds.n_bad_lines == 1 and len(ds) == 3
    ds.skip_bad = False
    with pytest.raises(DataError, match=r"s\.jsonl:2: .*corrupt\.webp: cannot decode"):
        ds[1]
    with pytest.raises(DataError, match=r"s\.jsonl:3: .*missing\.webp: video file does not exist"):
        ds[2]
    ds.skip_bad = True                                       # bad samples are replaced and counted
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["n_bad"] == 3 and batch["video"].shape[0] == 3 and batch["id"] == ["ok", "ok", "ok"]


def test_mp4_without_pyav_says_how_to_fix(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "av" else real_import(name, *a, **k))
    (tmp_path / "v.mp4").write_bytes(b"\x00")
    with pytest.raises(DataError, match="needs PyAV"):
        read_frames(tmp_path / "v.mp4", lambda n: [0])


def test_dataset_items_do_not_depend_on_worker_or_order(toyworld):
    ds = VideoTextDataset(toyworld / "train.jsonl", 8, 32, train=True, seed=3, noise_grid=(8, 16))
    a, b = ds[(5, 2)], ds[(5, 2)]
    ds[(7, 2)]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["mask_noise"], b["mask_noise"])
    assert not torch.equal(a["video"], ds[(5, 3)]["video"])     # another epoch, another augmentation


def test_step_sampler_splits_global_batches_and_resumes():
    one = StepSampler(40, 4, seed=1)
    ranks = [StepSampler(40, 2, rank=r, world=2, seed=1) for r in range(2)]
    it1, its = iter(one), [iter(r) for r in ranks]
    for _ in range(25):                                      # across epoch boundaries (10 steps/epoch)
        assert next(it1) == next(its[0]) + next(its[1])
    resumed, fresh = iter(StepSampler(40, 4, seed=1, start=13)), iter(StepSampler(40, 4, seed=1))
    for _ in range(13):
        next(fresh)
    assert [next(resumed) for _ in range(5)] == [next(fresh) for _ in range(5)]
    with pytest.raises(DataError, match="fewer than one global micro-batch"):
        StepSampler(3, 4)
