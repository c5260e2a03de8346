"""Real encoded video files through read_frames and the dataset: written here with PyAV (H.264 in .mp4 where the
installed PyAV can encode it, else MPEG-4 Part 2; VP9 in .webm; .mkv), read back at the frames the samplers pick,
close to the source pixels, decoded by seeking rather than whole, and their sound track read as stage 2's audio."""
import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from data import (DataError, VideoTextDataset, clip_index, frame_indices, index_clip, read_audio_from_video,  # noqa: E402
                  read_frames, write_video)


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """10 s at 480p and 30 fps (300 frames, a keyframe every 30), each frame carrying its index (index_clip)."""
    frames = index_clip(300, 480, 640)
    path = write_video(tmp_path_factory.mktemp("video") / "long.mp4", frames,
                       options={"g": "30", "crf": "18", "preset": "ultrafast"})
    return path, frames


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_toyworld_clip_as_a_video_file_reads_back_its_frames(toyworld, tmp_path, suffix):
    """A ToyWorld clip (16 frames of 32 x 32) encoded and decoded: every frame comes back in order, each nearest
    to its own source frame among the 16, at PSNR >= 24 dB (4:2:0 chroma on 32-pixel frames with per-pixel noise
    costs most of it: about 30 dB with H.264 or VP9, 25 with MPEG-4 Part 2)."""
    src = read_frames(toyworld / "videos" / "val_00000.webp", lambda n: range(n))
    path = write_video(tmp_path / f"clip{suffix}", src, options={"crf": "18"} if suffix != ".mkv" else None)
    got = read_frames(path, lambda n: range(n))
    assert got.shape == src.shape and got.dtype == np.uint8
    assert psnr(got, src) >= 24, psnr(got, src)
    nearest = [int(np.argmax([psnr(g, s) for s in src])) for g in got]
    assert nearest == list(range(16)), nearest


def test_long_clip_gives_the_sampled_frames_by_seeking(long_clip):
    """Evaluation (middle of each segment) and training (random in each segment) picks come back as those exact
    frames (read from the index pattern), close to the source (PSNR >= 30 dB at crf 18), by keyframe seeks: far
    fewer frames decoded than the file holds, and only the picked ones converted to RGB."""
    path, src = long_clip
    rng = np.random.default_rng(0)
    for train in (False, True):
        picked, stats = [], {}
        got = read_frames(path, lambda n: picked.append(frame_indices(n, 8, train, rng)) or picked[-1], stats=stats)
        assert [clip_index(f) for f in got] == picked[0], (train, picked[0])
        assert min(psnr(g, src[i]) for g, i in zip(got, picked[0])) >= 30
        assert stats["seeks"] >= 4 and stats["decoded"] < 200 and stats["converted"] == 8, stats


def test_long_clip_shrinks_while_decoding(long_clip):
    """short_side: frames come back shrunk (aspect kept) with the stored size reported, still the right frames."""
    path, _ = long_clip
    src_hw = []
    got = read_frames(path, lambda n: frame_indices(n, 8, False), short_side=224, src_hw=src_hw)
    assert got.shape == (8, 224, 299, 3) and src_hw == [480, 640]
    assert [clip_index(f) for f in got] == frame_indices(300, 8, False)


def test_clip_shorter_than_the_frames_asked_for(tmp_path):
    """5 frames, 8 asked: the samplers repeat frames as they do for a short frame folder; past the end -> the last."""
    path = write_video(tmp_path / "short.mp4", index_clip(5, 64, 64))
    for train in (False, True):
        want = frame_indices(5, 8, train, np.random.default_rng(1))
        got = read_frames(path, lambda n: frame_indices(n, 8, train, np.random.default_rng(1)))
        assert [clip_index(f) for f in got] == want
    assert [clip_index(f) for f in read_frames(path, lambda n: [0, n - 1, n + 3])] == [0, 4, 4]


def test_dataset_reads_video_files_and_does_not_cache_them(tmp_path, long_clip, monkeypatch):
    """A JSONL of mp4 lines trains and evaluates through VideoTextDataset: the clip tensor has the asked shape, and
    the frame cache (meant for frame stores such as ToyWorld's WebP) keeps none of it."""
    import data
    path, _ = long_clip
    (tmp_path / "train.jsonl").write_text(f'{{"id": "a", "video": "{path}", "caption": "a test pattern"}}\n')
    monkeypatch.setattr(data, "_FRAME_CACHE", data.FrameCache())
    for train in (True, False):
        ds = VideoTextDataset(tmp_path / "train.jsonl", 4, 32, train=train, cache=True)
        x = ds[0]["video"]
        assert x.shape == (3, 4, 32, 32) and torch.isfinite(x).all()
    assert not data._FRAME_CACHE.clips


def test_sound_track_of_a_video_file_is_read_as_stage_2_audio(tmp_path):
    """A 440 Hz tone stored at 44.1 kHz in an mp4 (AAC) comes back mono at 16 kHz with its peak at 440 Hz; the
    stage-2 fields take it for a line without `audio` when audio_from_video; a file without sound is named."""
    from data import WordPieceTokenizer, build_vocab, stage2_fields
    sr = 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2 * sr) / sr)
    path = write_video(tmp_path / "tone.mp4", index_clip(30, 64, 64), audio=tone, sample_rate=sr)
    wave = read_audio_from_video(path)
    assert abs(wave.numel() - 32000) < 1024                     # 2 s at 16 kHz (AAC adds up to one frame)
    peak = torch.fft.rfft(wave).abs().argmax().item() * 16000 / wave.numel()
    assert abs(peak - 440) < 2, peak
    build_vocab(["a tone"], tmp_path / "vocab.txt")
    tok = WordPieceTokenizer(tmp_path / "vocab.txt")
    rec = {"_root": str(tmp_path), "video": "tone.mp4", "caption": "a tone", "id": "t"}
    out = stage2_fields(tok, ["caption"], 8, audio_frames=100, train=False, audio_from_video=True)(rec, None)
    assert out["fbank"].shape == (100, 64) and out["fbank"].abs().sum() > 0
    with pytest.raises(DataError, match="--audio_from_video"):
        stage2_fields(tok, ["caption"], 8, audio_frames=100, train=False)(rec, None)
    silent = write_video(tmp_path / "silent.mp4", index_clip(10, 64, 64))
    with pytest.raises(DataError, match="silent.mp4: no sound track"):
        read_audio_from_video(silent)
