"""The official annotation files read as they are (data.load_official_json): InternVideo2's stage-2 JSON (video or
image, a caption string or list, `*caption*` keys, a clip's frame range) with a separate media root, MSR-VTT-style
caption lists, VideoChat2's instruction files ("QA": [{"i", "q", "a"}]); records the official loader drops are
counted and named; a stage script trains on such a folder."""
import json

import numpy as np
import pytest
import torch

from data import (DataError, VideoTextDataset, frame_indices, load_jsonl, positive_id, sample_file, stage3_turns)


@pytest.fixture
def official(toyworld, tmp_path):
    """A folder with train.json / val.json in the official layouts; the media live under ToyWorld's folder (the
    official `data_root`), not beside the annotation files; one image record (a still, by absolute path)."""
    from PIL import Image
    from data import read_frames
    folder = tmp_path / "anno"
    folder.mkdir()
    Image.fromarray(read_frames(toyworld / "videos" / "train_00004.webp", lambda n: [0])[0]).save(tmp_path / "still.jpg")
    train = [{"video": "videos/train_00000.webp", "caption": "a red circle moving left"},
             {"video": "videos/train_00001.webp", "caption": ["the first caption here", "ok", "a second caption"],
              "selected_audio_caption": "a low horn beeping"},
             {"video": "videos/train_00002.webp", "caption": "dog"},                       # under 2 words: dropped
             {"video": "videos/train_00003.webp", "caption": "a clip of a clip", "video_start_frame": 4,
              "video_end_frame": 11},
             {"image": str(tmp_path / "still.jpg"), "caption": "a still picture of a frame"}]
    val = [{"video": "videos/val_00000.webp", "caption": ["one two three", "four five six"]},
           {"video": "videos/val_00001.webp", "caption": "seven eight nine"}]
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "val.json").write_text(json.dumps(val))
    return folder


def test_stage2_json_with_a_data_root_and_the_official_filter(official, toyworld, capsys):
    records, dropped = load_jsonl(sample_file(official, "train"), data_root=toyworld)
    assert sample_file(official, "train").name == "train.json" and dropped == 1
    assert "record 3: 'caption' is shorter than 2 words" in capsys.readouterr().err
    assert [r["_line"] for r in records] == [1, 2, 4, 5] and all(r["_root"] == str(toyworld) for r in records)
    assert records[1]["caption"] == ["the first caption here", "a second caption"]      # "ok" dropped from the list
    assert records[1]["selected_audio_caption"] == "a low horn beeping"
    ds = VideoTextDataset(sample_file(official, "train"), 4, 32, train=True, data_root=toyworld)
    assert ds[1]["video"].shape == (3, 4, 32, 32) and ds[1]["caption"] == records[1]["caption"]
    held = VideoTextDataset(sample_file(official, "train"), 4, 32, train=False, data_root=toyworld)
    still = held[len(held) - 1]["video"]                    # evaluation reads the caption list as two lines
    assert records[3]["video"].endswith("still.jpg") and all(torch.equal(still[:, 0], still[:, t]) for t in range(4))


def test_caption_lists_are_one_text_each_in_evaluation(official, toyworld):
    """MSR-VTT-style: a video with two captions gives two held-out texts whose positive is that one video."""
    ds = VideoTextDataset(sample_file(official, "val"), 4, 32, train=False, data_root=toyworld)
    assert [r["caption"] for r in ds.records] == ["one two three", "four five six", "seven eight nine"]
    ids = [positive_id(r, "caption") for r in ds.records]
    assert ids[0] == ids[1] != ids[2]
    from data import WordPieceTokenizer, build_vocab, stage2_fields          # training: one caption drawn per sample
    build_vocab(["one two three four five six"], official / "vocab.txt")
    tok = WordPieceTokenizer(official / "vocab.txt")
    rec = {"caption": ["one two three", "four five six"], "id": "v", "_root": "."}
    drawn = {tuple(stage2_fields(tok, ["caption"], 8)(rec, np.random.default_rng(s))["ids_caption"].tolist())
             for s in range(8)}
    assert drawn == {tuple(tok.encode([c], 8)[0][0].tolist()) for c in rec["caption"]}


def test_a_clips_frame_range_is_sampled_inside_it(tmp_path, monkeypatch):
    """video_start_frame / video_end_frame: the segments split frames 20..39 of a 60-frame file."""
    pytest.importorskip("av")
    from data import clip_index, index_clip, write_video
    write_video(tmp_path / "long.mp4", index_clip(60, 64, 96))
    (tmp_path / "a.json").write_text(json.dumps([{"video": "long.mp4", "caption": "a test pattern",
                                                  "video_start_frame": 20, "video_end_frame": 39}]))
    import data
    picked, real = [], data.read_frames

    def spy(path, indices_fn, *a, **k):                # the frames the dataset picked, read back from their pixels
        picked.append([clip_index(f) for f in real(path, indices_fn)])
        return real(path, indices_fn, *a, **k)
    monkeypatch.setattr(data, "read_frames", spy)
    VideoTextDataset(tmp_path / "a.json", 4, 32, train=False)[0]
    assert picked[0] == [20 + i for i in frame_indices(20, 4, False)]


def test_videochat2_start_and_end_seconds(tmp_path):
    """"start" / "end" (seconds) of a VideoChat2 record: the segments split that part of the video file only."""
    pytest.importorskip("av")
    from data import clip_index, index_clip, read_frames, write_video
    write_video(tmp_path / "v.mp4", index_clip(90, 64, 96), fps=30)                    # 3 s
    got = read_frames(tmp_path / "v.mp4", lambda n: frame_indices(n, 4, False), seconds=(1.0, 2.0))
    assert [clip_index(f) for f in got] == [30 + i for i in frame_indices(31, 4, False)]
    (tmp_path / "it.json").write_text(json.dumps([{"video": "v.mp4", "start": 1.0, "end": 2.0,
                                                   "QA": [{"q": "what is it?", "a": "a pattern"}]}]))
    assert VideoTextDataset(tmp_path / "it.json", 4, 32, train=False)[0]["video"].shape == (3, 4, 32, 32)


def test_videochat2_instruction_file(toyworld, tmp_path):
    """"QA" turns become one multi-turn conversation; the first turn's instruction leads its question (the visual
    slots keep their place); a file without captions trains instruction tuning, and sub-stage 1 names the gap."""
    (tmp_path / "it.json").write_text(json.dumps([
        {"video": "videos/train_00000.webp", "QA": [{"i": "Watch the video.", "q": "what color is it?", "a": "red"},
                                                    {"i": "", "q": "which way?", "a": "left"}]}]))
    (rec,), _ = load_jsonl(tmp_path / "it.json", data_root=toyworld)
    rng = np.random.default_rng(0)
    assert stage3_turns(rec, 3, rng) == [("Watch the video. what color is it?", "red"), ("which way?", "left")]
    with pytest.raises(DataError, match="caption"):
        stage3_turns(rec, 1, rng)


def test_malformed_records_are_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"caption": "no video here at all"}]))
    with pytest.raises(DataError, match=r"bad.json: record 1: no 'video' \(or 'image'\) path"):
        load_jsonl(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text(json.dumps({"video": "x"}))
    with pytest.raises(DataError, match="one JSON list of records"):
        load_jsonl(tmp_path / "dict.json")


def test_stage_scripts_and_evaluate_on_an_official_folder(official, toyworld, tmp_path):
    """Stage 1 and stage 2 train on train.json with --data_root; stage 2's held-out evaluation and `evaluate.py`
    read val.json (its caption list as two queries)."""
    import evaluate
    import train_stage1
    import train_stage2
    common = [f"--data={official}", f"--data_root={toyworld}", "--batch_size=2", "--workers=0"]
    train_stage1.main(common + [f"--out_dir={tmp_path / 's1'}", "--max_steps=1", "--warmup_steps=0", "--eval=False",
                                "--random_teachers=True"])
    train_stage2.main(common + [f"--out_dir={tmp_path / 's2'}", "--max_steps=1", "--num_frames=4", "--audio=none",
                                "--random_text=True", f"--vocab={toyworld / 'vocab.txt'}",
                                f"--init_from={tmp_path / 's1' / 'ckpt.pt'}"])
    assert "t2v_r1" in json.loads((tmp_path / "s2" / "metrics.json").read_text())
    out = evaluate.main(["zeroshot", f"--ckpt={tmp_path / 's2' / 'ckpt.pt'}", f"--data={official}",
                         f"--data_root={toyworld}", f"--vocab={toyworld / 'vocab.txt'}", f"--out={tmp_path / 'z.json'}"])
    assert 0 <= out["t2v_r1"] <= 1 and (tmp_path / "z.json").exists()
