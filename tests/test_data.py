"""data.py: ToyWorld, the reader and its errors, frame sampling, the resumable sampler."""
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (DataError, StepSampler, VideoTextDataset, collate, frame_indices, load_fbank, load_jsonl, make_toyworld,
                  read_frames, video_transform)


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


def test_skipped_lines_are_reported_and_a_bom_is_accepted(tmp_path, toyworld, capsys):
    good = json.dumps({"id": "ok", "video": "videos/train_00000.webp"})
    path = _sample_file(tmp_path, toyworld, [good, "{bad json", good])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())          # a Windows editor's byte-order mark
    records, n_bad = load_jsonl(path, skip_bad=True)
    assert [r["_line"] for r in records] == [1, 3] and n_bad == 1       # sample 1 survives the BOM
    assert capsys.readouterr().err.strip().splitlines() == [f"skipping malformed line: {path}:2: "
                                                            "Expecting property name enclosed in double quotes: "
                                                            "line 1 column 2 (char 1)"]
    with pytest.raises(DataError, match=r"s\.jsonl:2: malformed"):
        load_jsonl(path)


def test_undecodable_bytes_and_non_string_paths_are_malformed_lines(tmp_path, toyworld, capsys):
    good = json.dumps({"id": "ok", "video": "videos/train_00000.webp"}).encode()
    bad = [b'{"video": "caf\xe9.webp"}', b'{"video": 5}', b'{"video": "v.webp", "audio": ["a.wav"]}']
    why = ["not UTF-8", "field 'video' must be a path string, got 5", "field 'audio' must be a path string"]
    path = tmp_path / "s.jsonl"
    for line, reason in zip(bad, why):
        path.write_bytes(b"\n".join([good, line, good]) + b"\n")
        with pytest.raises(DataError, match=rf"s\.jsonl:2: malformed sample line \({re.escape(reason)}"):
            load_jsonl(path)
    path.write_bytes(b"\n".join([good, *bad, good, b'{"video": "v.webp", "audio": null}']) + b"\n")
    records, n_bad = load_jsonl(path, skip_bad=True)                     # decoded line by line: the rest loads
    assert [r["_line"] for r in records] == [1, 5, 6] and n_bad == 3     # "audio": null = no audio
    err = capsys.readouterr().err
    assert all(f"s.jsonl:{i}: {w}" in err for i, w in zip((2, 3, 4), why))


def test_nan_and_truncated_audio_name_the_file(tmp_path):
    import soundfile as sf
    wave = (0.3 * np.sin(np.arange(16000) / 7)).astype(np.float32)
    sf.write(tmp_path / "ok.wav", wave, 16000, subtype="PCM_16")
    assert load_fbank(tmp_path / "ok.wav", 98, train=False).shape == (98, 64)
    sf.write(tmp_path / "nan.wav", np.where(np.arange(16000) == 500, np.nan, wave).astype(np.float32), 16000,
             subtype="FLOAT")
    with pytest.raises(DataError, match=r"nan\.wav: non-finite samples"):
        load_fbank(tmp_path / "nan.wav", 98, train=False)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:-10001])   # header: 16000 frames
    assert sf.info(tmp_path / "cut.wav").frames == len(sf.read(tmp_path / "cut.wav")[0])  # soundfile hides it
    with pytest.raises(DataError, match=r"cut\.wav: truncated audio file \(10001 bytes"):
        load_fbank(tmp_path / "cut.wav", 98, train=False)


def _old_video_transform(frames, size, train, rng=None, scale=(0.5, 1.0), hflip=False):
    """video_transform as it was: the whole clip converted to float, then cropped."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    H, W = x.shape[-2:]
    if train and scale[0] < 1.0:
        for _ in range(10):
            area = H * W * rng.uniform(*scale)
            ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < w <= W and 0 < h <= H:
                top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                x = x[..., top:top + h, left:left + w]
                break
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if train and hflip and rng.random() < 0.5:
        x = x.flip(-1)
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()


def test_video_transform_crops_in_uint8_bit_identically():
    clip = np.random.default_rng(0).integers(0, 256, (6, 40, 56, 3), dtype=np.uint8)
    for seed in range(12):
        for size, train, scale, hflip in ((24, True, (0.5, 1.0), True), (32, True, (0.08, 1.0), False),
                                          (40, True, (1.0, 1.0), False), (24, False, (0.5, 1.0), False)):
            new = video_transform(clip, size, train, np.random.default_rng(seed), scale, hflip)
            old = _old_video_transform(clip, size, train, np.random.default_rng(seed), scale, hflip)
            assert torch.equal(new, old), (seed, size, train, scale)


def _large_clips(tmp_path, n=2):
    """Frame folders of smooth 120 x 200 frames (a crop box off by a few pixels would show)."""
    rng, lines = np.random.default_rng(1), []
    for c in range(n):
        (tmp_path / f"clip{c}").mkdir()
        for t in range(6):
            small = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
            small.resize((200, 120), Image.BICUBIC).save(tmp_path / f"clip{c}" / f"{t}.png")
        lines.append(json.dumps({"id": f"c{c}", "video": f"clip{c}"}))
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "big.jsonl"


def test_frame_cache_shrinks_large_clips_keeps_toyworld_exact_and_has_a_budget(tmp_path, toyworld, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(data, "_FRAME_CACHE", data.FrameCache())
    kw = dict(train=True, seed=2, crop_scale=(0.5, 1.0), hflip=True)
    # ToyWorld (32 px <= the 53 px kept for 32 px crops): stored as decoded, items bit-identical to no cache
    on, off = (VideoTextDataset(toyworld / "train.jsonl", 8, 32, cache=c, **kw) for c in (None, False))
    assert on.cache and not off.cache
    for i in (0, 5):
        assert torch.equal(on[(i, 1)]["video"], off[(i, 1)]["video"])
    frames, src = data._FRAME_CACHE.clips[(str(toyworld / "videos/train_00000.webp"), 53)]
    assert src == (32, 32) and np.array_equal(frames, read_frames(toyworld / "videos/train_00000.webp", range))
    # a large clip is stored shrunk to 27 px on the short side (16 / sqrt(0.75 * 0.5)), with the same crop box
    jsonl = _large_clips(tmp_path)
    monkeypatch.setattr(data, "_FRAME_CACHE", data.FrameCache())
    on, off = (VideoTextDataset(jsonl, 4, 16, cache=c, **kw) for c in (True, False))
    keys = [(i, e) for i in range(2) for e in range(4)]            # (index, epoch): 8 different crops
    items = [on[k]["video"] for k in keys]
    frames, src = data._FRAME_CACHE.clips[(str(tmp_path / "clip0"), 27)]
    assert frames.shape == (6, 27, 45, 3) and frames.dtype == np.uint8 and src == (120, 200)
    diff = np.mean([(a - off[k]["video"]).abs().mean().item() for k, a in zip(keys, items)])
    assert len(data._FRAME_CACHE.clips) == 2                       # cache=False stored nothing
    # the box drawn on the stored 27 x 45 frames instead would be another crop: 4x further off (0.34 vs 0.08)
    full, naive = read_frames(tmp_path / "clip0", range), []
    for seed in range(8):
        a, b = (video_transform(f, 16, True, np.random.default_rng(seed)) for f in (full, frames))
        naive.append((a - b).abs().mean().item())
    assert diff < 0.12 and np.mean(naive) > 0.2, (diff, naive)   # a resampling difference only (std 1)
    assert not capsys.readouterr().err
    # over budget: nothing more is stored, one note, and the very same items (shrunk the same way)
    monkeypatch.setattr(data, "_FRAME_CACHE", data.FrameCache())
    tight = VideoTextDataset(jsonl, 4, 16, cache=True, cache_mb=0.01, **kw)
    assert all(torch.equal(tight[k]["video"], a) for k, a in zip(keys, items))
    assert not data._FRAME_CACHE.clips and capsys.readouterr().err.count("frame cache: the 0.01 MB budget") == 1
