"""data.py: ToyWorld, the on-disk sample format and its readers, video decoding, frame sampling, transforms, the
resumable sampler, the tokenizers and the chat format. (The stage-1 masks live in model.py, beside the token
layout they index.)

The data format (README, "Your own data") is a JSONL file, one sample per line, paths relative to the file:

    {"id": "clip0", "video": "videos/clip0.mp4", "audio": "audio/clip0.wav", "caption": "a dog runs"}

`video` is a folder of frames, a GIF or WebP (pillow), or a video file (mp4, webm, mkv, ... through PyAV, decoded
at the sampled frames only); `audio` (WAV/FLAC, or the video file's own sound), `audio_caption`, `asr`,
`avs_caption`, `qa` ([{"q", "a"}]) are optional. Anything else on the line (ToyWorld's `attrs`) is carried along
untouched. The official annotation files (one JSON list: InternVideo2's stage-2 files, MSR-VTT's, VideoChat2's
instruction files) are read as they are: load_official_json.

ToyWorld is the embedded default: a seeded generator of 32x32, 16-frame clips of one shape (4 shapes,
6 colours, 2 sizes) moving in one of 4 directions at one of 2 speeds over a textured background (no
motion trail: a single frame shows neither direction nor speed), with a 1 s, 16 kHz sound track (a beep whose
timbre follows the shape, pitch the size and rhythm the speed, then two synthetic "spoken" words) and every caption
type. It is written to disk in the real format, so the real reader is what every run uses.

    python data.py --out=data/toyworld      # writes train.jsonl + val.jsonl (about 10 s on 2 cores)
    python data.py --out=my_videos --n_train=48 --n_val=16 --as_videos=mp4   # the same as a folder of mp4 files
"""
import json
import math
import re
import sys
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # every official loader normalises with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A sample or sample file that cannot be used; the message names the file (and line)."""


# ------------------------------------------------------------------------------------------------
# ToyWorld

SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {"red": (220, 45, 45), "green": (50, 200, 70), "blue": (60, 90, 235),
          "yellow": (235, 215, 50), "purple": (170, 70, 210), "white": (235, 235, 235)}
SIZES = {"small": 4.5, "large": 7.0}               # radius in pixels at 32 px
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slowly": 0.6, "quickly": 1.6}            # pixels per frame over 16 frames
TIMBRES = {"circle": "whistle", "square": "buzz", "triangle": "horn", "cross": "bell"}
PITCHES = {"small": ("high", 880.0), "large": ("low", 330.0)}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket"]
# the attributes a probe or a question can ask about, with their classes (chance = 1 / classes)
ATTRIBUTES = {"shape": SHAPES, "color": list(COLORS), "size": list(SIZES),
              "direction": list(DIRECTIONS), "speed": list(SPEEDS)}
QUESTIONS = {"shape": "what shape is the object?", "color": "what color is the object?",
             "size": "is the object small or large?", "direction": "which way is the object moving?",
             "speed": "is the object moving slowly or quickly?"}
# what each caption type says about a clip: ToyWorld's retrieval positives share these attributes
CAPTION_ATTRS = {"caption": ("shape", "color", "size", "direction", "speed"),
                 "audio_caption": ("shape", "size", "speed"),
                 "avs_caption": ("shape", "color", "size", "direction", "speed", "words")}
VIDEO_TEMPLATES = ["a {size} {color} {shape} moving {direction} {speed}",
                   "a {color} {shape}, {size}, moves {direction} {speed}",
                   "the {size} {color} {shape} goes {direction} {speed}"]
CAPTION_PROMPTS = ["describe the video.", "what happens in the video?", "give a short caption of the video."]
FRAMES, SIZE_PX, SAMPLE_RATE, AUDIO_SECONDS = 16, 32, 16000, 1.0


def _shape_mask(shape, cx, cy, r, yy, xx):
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":                                   # apex up, base below the centre
        return (dy >= -r) & (dy <= 0.75 * r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dx) <= r / 3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r))


def _render_frames(a, rng):
    """(16, 32, 32, 3) uint8: a static textured background and one anti-aliased moving shape; only the
    comparison of frames shows where it goes and how fast."""
    ss = 3                                                     # 3x supersampling for sub-pixel motion
    yy, xx = np.mgrid[0:SIZE_PX * ss, 0:SIZE_PX * ss] / ss + 0.5 / ss
    bg = rng.uniform(10, 90, size=3) + rng.normal(0, 10, size=(SIZE_PX, SIZE_PX, 3))
    r, speed = SIZES[a["size"]], SPEEDS[a["speed"]]
    (ux, uy), travel = DIRECTIONS[a["direction"]], SPEEDS[a["speed"]] * (FRAMES - 1)
    # across the motion the whole object stays in the frame; along it the path may reach the edge (a quick
    # object crosses most of the frame and ends partly outside), so that speed is plain to see
    lo, hi = r + 0.5, SIZE_PX - r - 0.5
    start = [rng.uniform(lo, hi), rng.uniform(lo, hi)]
    for axis, u in ((0, ux), (1, uy)):
        lo_m, hi_m = min(lo, 2.0 + 0.5 * r), max(hi, SIZE_PX - 2.0 - 0.5 * r)
        if u > 0:
            start[axis] = rng.uniform(lo_m, max(lo_m, hi_m - travel))
        elif u < 0:
            start[axis] = rng.uniform(min(hi_m, lo_m + travel), hi_m)
    color = np.array(COLORS[a["color"]], dtype=np.float64)
    frames = np.empty((FRAMES, SIZE_PX, SIZE_PX, 3), dtype=np.uint8)
    for t in range(FRAMES):
        img = bg.copy()
        cx, cy = start[0] + ux * speed * t, start[1] + uy * speed * t
        cover = _shape_mask(a["shape"], cx, cy, r, yy, xx).astype(np.float64)
        cover = cover.reshape(SIZE_PX, ss, SIZE_PX, ss).mean((1, 3))[..., None]   # (32, 32, 1) coverage
        img = img * (1 - cover) + color * cover
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def _tone(kind, f0, n, sr):
    t = np.arange(n) / sr
    if kind == "whistle":
        return np.sin(2 * np.pi * f0 * t)
    if kind == "buzz":
        return 0.6 * np.sign(np.sin(2 * np.pi * f0 * t))
    if kind == "horn":
        return sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.6
    return sum(np.sin(2 * np.pi * f0 * k * t) * np.exp(-6 * t) for k in (1.0, 2.76, 5.4)) * 0.7  # bell


def _word_sound(word, n, sr):
    """A synthetic 'spoken' word: two syllables, each two formant tones amplitude-modulated by a
    120 Hz glottal pulse; every word has its own formant pair sequence."""
    h = zlib.crc32(word.encode())
    formants = [(300 + 100 * ((h >> s) % 8), 900 + 250 * ((h >> (s + 3)) % 8)) for s in (0, 12)]
    t = np.arange(n // 2) / sr
    pulse = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 120 * t))
    env = np.sin(np.pi * np.arange(n // 2) / (n // 2))
    sylls = [(np.sin(2 * np.pi * f1 * t) + 0.6 * np.sin(2 * np.pi * f2 * t)) * pulse * env
             for f1, f2 in formants]
    return np.concatenate(sylls) * 0.5


def _render_audio(a, rng):
    """(16000,) float32 at 16 kHz: 0.0-0.45 s beeps tied to the scene, 0.5-1.0 s two spoken words."""
    sr, n = SAMPLE_RATE, int(SAMPLE_RATE * AUDIO_SECONDS)
    wav = np.zeros(n)
    beeps = 2 if a["speed"] == "slowly" else 5
    beep_len = int(0.45 * sr / beeps * 0.6)
    f0 = PITCHES[a["size"]][1]
    for b in range(beeps):
        s = int(b * 0.45 * sr / beeps)
        wav[s:s + beep_len] += _tone(TIMBRES[a["shape"]], f0, beep_len, sr) * np.hanning(beep_len)
    w = int(0.23 * sr)
    for j, word in enumerate(a["words"]):
        s = int(0.5 * sr) + j * (w + int(0.02 * sr))
        wav[s:s + w] += _word_sound(word, w, sr)
    wav += rng.normal(0, 0.002, n)
    return (0.5 * wav / max(1e-6, np.abs(wav).max())).astype(np.float32)


def toyworld_captions(a, template=0):
    """The texts that describe a clip with attributes a (words included): its video caption (VIDEO_TEMPLATES
    [template]), audio caption, ASR transcript and fused audio-visual-speech caption."""
    pitch, timbre = PITCHES[a["size"]][0], TIMBRES[a["shape"]]
    return {"caption": VIDEO_TEMPLATES[template].format(**a),
            "audio_caption": f"a {pitch} {timbre} beeping {a['speed']}, then a voice speaks",
            "asr": " ".join(a["words"]),
            "avs_caption": (f"a {a['size']} {a['color']} {a['shape']} moving {a['direction']} {a['speed']} "
                            f"with a {pitch} {timbre} sound while someone says {' '.join(a['words'])}")}


def toyworld_sample(split, i, seed):
    """Attributes, captions and QA of one clip (deterministic in (seed, split, i))."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    a = {k: str(rng.choice(v)) for k, v in ATTRIBUTES.items()}
    a["words"] = [str(w) for w in rng.choice(WORDS, size=2)]
    texts = toyworld_captions(a, int(rng.integers(len(VIDEO_TEMPLATES))))
    name = f"{split}_{i:05d}"
    sample = {"id": name, "video": f"videos/{name}.webp", "audio": f"audio/{name}.flac", **texts,
              "qa": [{"q": QUESTIONS[k], "a": a[k], "type": k} for k in ATTRIBUTES], "attrs": a}
    return sample, rng


def _write_clip(args):
    import soundfile as sf
    root, split, i, seed = args
    sample, rng = toyworld_sample(split, i, seed)
    frames = _render_frames(sample["attrs"], rng)
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(root / sample["video"], save_all=True, append_images=ims[1:], lossless=True,
                duration=80, method=0, minimize_size=False, kmin=0, kmax=0)
    sf.write(root / sample["audio"], _render_audio(sample["attrs"], rng), SAMPLE_RATE, subtype="PCM_16")
    return sample


TOYWORLD = "data/toyworld"           # every stage's default --data: written there on first use


def prepare_toyworld(path, rt):
    """At the start of a run: rank 0 writes ToyWorld when `path` is its default location (a no-op when
    it is there already), and every rank waits for it."""
    from common import barrier
    if str(path) == TOYWORLD and rt.master:
        make_toyworld(path)
    barrier(rt)


def make_toyworld(root=TOYWORLD, n_train=2000, n_val=500, seed=0, workers=2, verbose=True):
    """Write ToyWorld to `root` (train.jsonl, val.jsonl, videos/, audio/, meta.json) unless a copy
    with the same settings is already there. Returns the root as a Path."""
    root = Path(root)
    meta = {"version": 7, "n_train": n_train, "n_val": n_val, "seed": seed}
    if (root / "meta.json").exists() and json.loads((root / "meta.json").read_text()).get("settings") == meta:
        return root
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(root, s, i, seed) for s, n in (("train", n_train), ("val", n_val)) for i in range(n)]
    from tqdm import tqdm
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            samples = list(tqdm(pool.imap(_write_clip, jobs, chunksize=32), total=len(jobs),
                                desc=f"ToyWorld -> {root}", disable=not verbose))
    else:
        samples = [_write_clip(j) for j in tqdm(jobs, desc=f"ToyWorld -> {root}", disable=not verbose)]
    for split in ("train", "val"):
        with open(root / f"{split}.jsonl", "w") as f:
            for s in samples:
                if s["id"].startswith(split):
                    f.write(json.dumps(s) + "\n")
    build_vocab([s[k] for s in samples for k in TEXT_KEYS] + [t for s in samples for qa in s["qa"] for t in qa.values()]
                + [" ".join(v) for v in ATTRIBUTES.values()] + CAPTION_PROMPTS, root / "vocab.txt")
    chance = {k: 1.0 / len(v) for k, v in ATTRIBUTES.items()}
    (root / "meta.json").write_text(json.dumps({"settings": meta, "attributes": ATTRIBUTES,
                                                "chance": chance}, indent=1))
    return root


# ------------------------------------------------------------------------------------------------
# the on-disk format: JSONL, frames, audio

PATH_KEYS = ("video", "audio")      # the record fields that name files, relative to the JSONL


def sample_file(data, split):
    """--data (a folder) and a split -> its sample file: <split>.jsonl, else the official layout's <split>.json."""
    for suffix in (".jsonl", ".json"):
        if (Path(data) / f"{split}{suffix}").exists():
            return Path(data) / f"{split}{suffix}"
    return Path(data) / f"{split}.jsonl"             # absent: load_jsonl names it


MIN_CAPTION_WORDS = 2   # the official loader drops shorter captions (min_caption_length, MM/dataset/pt_dataset.py:30)


def _words(text):
    return len(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def official_record(anno):
    """One record of the official annotation files -> (this format's record, None), or (None, why) when the
    official loader would drop it (a short caption); a malformed record raises DataError. The layouts (read as they are, with the official field names):
      stage 2 (MM/dataset/pt_dataset.py:127-160, 221-229, 289-301): {"video" or "image": path, "caption": str or
        [str, ...], optional "audio", "asr", other keys holding "caption" (the audio-visual files' `*_caption(s)`), and
        "video_start_frame" / "video_end_frame"}; captions under 2 words are dropped (:68-111);
      MSR-VTT-style retrieval (MM/dataset/ret_dataset.py): the same with a caption list per video;
      VideoChat2 instruction tuning (VC2/dataset/it_dataset_mistral.py:59-104): {"video", "QA": [{"i", "q", "a"}],
        optional "start" / "end"}; the QA turns become `conversations`, the first turn's "i" the instruction.
    A caption list stays a list: training draws one caption per sample (the official "uniform" augmentation),
    evaluation reads each as its own text (VideoTextDataset)."""
    rec = dict(anno)
    if "image" in rec and "video" not in rec:
        rec["video"] = rec.pop("image")
    if "QA" in rec:
        qa = rec.pop("QA")
        if not isinstance(qa, list) or not qa or not all(isinstance(t, dict) and "q" in t and "a" in t for t in qa):
            raise DataError("'QA' must be a non-empty list of {\"i\", \"q\", \"a\"}")
        rec["conversations"] = [{"q": t["q"], "a": t["a"]} for t in qa]
        if qa[0].get("i"):
            rec["instruction"] = qa[0]["i"]
    for key in [k for k in rec if "caption" in k and "asr" not in k]:
        value = rec[key]
        if isinstance(value, list):
            rec[key] = [c for c in value if isinstance(c, str) and _words(c) >= MIN_CAPTION_WORDS]
            if not rec[key]:
                return None, f"every {key!r} is shorter than {MIN_CAPTION_WORDS} words"
        elif not isinstance(value, str) or _words(value) < MIN_CAPTION_WORDS:
            return None, f"{key!r} is shorter than {MIN_CAPTION_WORDS} words: {json.dumps(value)[:40]}"
    if not isinstance(rec.get("video"), str):
        raise DataError("no 'video' (or 'image') path")
    return rec, None


def load_official_json(path, skip_bad=False, data_root=None):
    """An official annotation file (one JSON list, see official_record) -> (records, n_dropped), records as
    load_jsonl's: `_line` is the record's 1-based position in the list, `_root` is data_root (the media prefix,
    the official `data_root`) or the file's folder. Records the official loader drops (short captions) are
    counted and named on stderr; a malformed one raises DataError naming the file and position, or with
    skip_bad is dropped the same way."""
    path = Path(path)
    try:
        annos = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(annos, list):
        raise DataError(f"{path}: an official annotation file is one JSON list of records")
    records, dropped = [], 0
    for i, anno in enumerate(annos, start=1):
        try:
            if not isinstance(anno, dict):
                raise DataError("not a JSON object")
            rec, why = official_record(anno)
        except DataError as e:                       # malformed: an error, or with skip_bad dropped like the rest
            if not skip_bad:
                raise DataError(f"{path}: record {i}: {e}") from None
            rec, why = None, str(e)
        if why:
            print(f"dropping {path}: record {i}: {why}", file=sys.stderr)
            dropped += 1
            continue
        rec["_line"], rec["_root"] = i, str(data_root or path.parent)
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no usable samples ({dropped} dropped)")
    if dropped:
        print(f"{path}: {dropped} of {len(annos)} records dropped", file=sys.stderr)
    return records, dropped


def load_jsonl(path, skip_bad=False, required=("video",), data_root=None):
    """Parse a sample file. Returns (records, n_bad). Each record gets `_line` (1-based) and `_root`
    (the JSONL's folder, or data_root). A `.json` file is an official annotation file (load_official_json).
    A malformed line (not UTF-8, not a JSON object, a required field missing, a path field that is not a
    string) raises DataError naming the file and line, or with skip_bad is counted, reported on stderr and
    skipped. A UTF-8 byte-order mark (Windows editors) is accepted."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"sample file {path} does not exist")
    if path.suffix.lower() == ".json":
        return load_official_json(path, skip_bad, data_root)
    records, bad = [], 0
    with open(path, "rb") as f:                    # bytes: one undecodable line must not sink the others
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")      # -sig drops a leading BOM
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("a line must be a JSON object")
                missing = [k for k in required if not rec.get(k)]
                if missing:
                    raise ValueError(f"missing field(s) {missing}")
                for k in PATH_KEYS:                # null = absent; a number or list would fail later, far away
                    if rec.get(k) is not None and not isinstance(rec[k], str):
                        raise ValueError(f"field {k!r} must be a path string, got {json.dumps(rec[k])[:40]}")
            except ValueError as e:                # UnicodeDecodeError and JSONDecodeError are ValueErrors
                why = f"not UTF-8 ({e})" if isinstance(e, UnicodeDecodeError) else str(e)
                if not skip_bad:
                    raise DataError(f"{path}:{lineno}: malformed sample line ({why})") from None
                print(f"skipping malformed line: {path}:{lineno}: {why}", file=sys.stderr)
                bad += 1
                continue
            rec["_line"], rec["_root"] = lineno, str(data_root or path.parent)
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no usable samples" + (f" ({bad} malformed lines skipped)" if bad else ""))
    return records, bad


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


CONTAINER_SEEK_AHEAD = 48   # before two keyframes are seen: decode forward up to this many frames, further seek


def read_frames(path, indices_fn, short_side=None, src_hw=None, stats=None, seconds=None):
    """Decode the frames of one video. `indices_fn(n_frames) -> list of frame indices` picks which
    frames to decode. `short_side` (optional) shrinks every frame to at most that short side as it is
    decoded (shrink_frame; a video file does it in FFmpeg's scaler, before the RGB conversion), and `src_hw`,
    a list, receives the (H, W) the video was stored at. Returns uint8 (T, H, W, 3). Raises DataError naming the file.

    Video files (mp4, webm, mkv, ... through PyAV) are never decoded whole: see _read_container, which counts
    its seeks and decoded frames into `stats` (a dict) when given one (tests and bench.py read them).
    `seconds` = (start, end): only that part of a video file is sampled (VideoChat2's `start` / `end`); a frame
    store, which has no frame rate, is read whole."""
    def keep(frame):                            # (H, W, 3) at the stored size -> what the caller wants
        if src_hw is not None:
            src_hw[:] = frame.shape[:2]
        return shrink_frame(frame, short_side) if short_side else frame
    path = Path(path)
    try:
        if path.is_dir():                                     # a folder of frame images
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise DataError(f"{path}: frame folder has no images")
            return np.stack([keep(np.asarray(Image.open(files[i]).convert("RGB"))) for i in indices_fn(len(files))])
        if not path.exists():
            raise DataError(f"{path}: video file does not exist")
        if is_frame_store(path):
            with Image.open(path) as im:
                out = []
                for i in indices_fn(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    out.append(keep(np.asarray(im.convert("RGB"))))
                return np.stack(out)
        try:
            import av
        except ImportError:
            raise DataError(f"{path}: reading {path.suffix} videos needs PyAV (pip install av), or "
                            f"convert the video to a frame folder, GIF or WebP") from None
        return _read_container(av, path, indices_fn, short_side, src_hw, {} if stats is None else stats, seconds)
    except DataError:
        raise
    except Exception as e:                                    # corrupt or unreadable media
        raise DataError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from None


def _read_container(av, path, indices_fn, short_side, src_hw, stats, seconds=None):
    """The picked frames of a video file, decoded with PyAV without decoding the whole file: the frame count
    comes from the container (or its duration x frame rate), each picked frame is reached by a keyframe seek
    and decoding forward from there, or by decoding forward alone when it is no further ahead than the
    keyframe spacing seen so far (a seek could not land closer; CONTAINER_SEEK_AHEAD until two keyframes are
    seen), and only the picked frames are converted to RGB, shrunk to `short_side` in the same step. Memory:
    the picked frames, whatever the video's length. A frame's index is its time x the average frame rate, so
    a variable-rate file is read at the nearest frames. A file without a usable frame rate or count is
    decoded from the start, converting only the picked frames."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        # one decoding thread: DataLoader workers are the parallelism, and frame threads would delay every frame
        # after a seek (measured: 8 frames from 10 s of 480p took 144 ms with FFmpeg's threads, 113 ms without)
        H, W = stream.codec_context.height, stream.codec_context.width
        size = {}
        if short_side and min(H, W) > short_side:   # shrink_frame's size, done by swscale
            k = short_side / min(H, W)
            size = dict(width=max(1, round(W * k)), height=max(1, round(H * k)), interpolation="AREA")
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        n = stream.frames
        if not n and rate and stream.duration:      # webm/mkv store no count: duration x rate
            n = int(round(float(stream.duration * stream.time_base) * rate))
        if not n or not rate:                       # nothing to seek by: count the packets, then decode once
            n = sum(1 for packet in container.demux(stream) if packet.size)
            if not n:
                raise DataError(f"{path}: no video frames")
            picks = indices_fn(n)
            container.seek(0)
            frames, stats["seeks"] = {}, 0
            for i, frame in enumerate(container.decode(stream)):
                stats["decoded"] = i + 1
                if i in picks:
                    frames[i] = frame
                if i >= max(picks):
                    break
            for i in picks:                          # a count above the frames decoded: the last frame again
                frames.setdefault(i, frames[max(frames)] if frames else None)
            if any(f is None for f in frames.values()):
                raise DataError(f"{path}: no video frames")
        else:
            first, last = 0, n - 1
            if seconds is not None:                   # a part of the video: its frames first..last, sampled alike
                first = min(n - 1, max(0, int(round(float(seconds[0]) * rate))))
                last = max(first, min(n - 1, int(round(float(seconds[1]) * rate))))
            picks = [first + i for i in indices_fn(last - first + 1)]
            t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            frames, at, it = {}, None, None          # at: index of the last decoded frame; it: the decoder
            keys = set()                             # indices of the keyframes decoded so far
            stats.update(seeks=0, decoded=0)
            for want in sorted(set(picks)):
                ks = sorted(keys)
                spacing = min((b - a for a, b in zip(ks, ks[1:])), default=CONTAINER_SEEK_AHEAD)
                if at is None or want <= at or want - at > spacing:
                    # seek to the keyframe at or before the wanted time (in the stream's time base)
                    container.seek(int((t0 + want / rate) / stream.time_base), stream=stream, backward=True)
                    it, at = container.decode(stream), None
                    stats["seeks"] += 1
                last = None
                for frame in it:                     # decode forward to the wanted frame (or the file's end)
                    last = frame
                    stats["decoded"] += 1
                    at = int(round((frame.time - t0) * rate)) if frame.time is not None else (at or -1) + 1
                    if frame.key_frame:
                        keys.add(at)
                    if at >= want:
                        break
                if last is None:                     # past the end (a short count): the last frame again
                    last = frames[max(frames)] if frames else None
                if last is None:
                    raise DataError(f"{path}: no video frames")
                frames[want] = last
        if src_hw is not None:
            src_hw[:] = (H, W)
        rgb = {i: f.to_ndarray(format="rgb24", **size) for i, f in frames.items()}
        stats["converted"] = len(rgb)
        return np.stack([rgb[i] for i in picks])


def video_encoder():
    """The codec write_video uses here: H.264 when the installed PyAV can encode it, else MPEG-4 Part 2."""
    import av
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            pass
    raise DataError("this PyAV can encode neither H.264 nor MPEG-4")


def write_video(path, frames, fps=30, codec=None, options=None, audio=None, sample_rate=16000):
    """uint8 (T, H, W, 3) -> a video file (mp4, webm, mkv, ... by its suffix) through PyAV; H and W even.
    codec: default VP9 for .webm, else video_encoder(); options: the encoder's (e.g. {"crf": "18", "g": "30"});
    audio: an optional float (N,) mono track in [-1, 1] at sample_rate, stored as AAC (Opus in .webm, at 8, 12,
    16, 24 or 48 kHz). For tests, bench.py and converting clips; not used in training."""
    import av
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec or ("libvpx-vp9" if path.suffix.lower() == ".webm" else video_encoder()),
                                rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = dict(options or {})
        sound = None
        if audio is not None:
            sound = out.add_stream("libopus" if path.suffix.lower() == ".webm" else "aac", rate=sample_rate)
            sound.layout = "mono"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
        if sound is not None:
            chunk = 1024
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            for s in range(0, len(pcm), chunk):
                frame = av.AudioFrame.from_ndarray(pcm[None, s:s + chunk], format="s16", layout="mono")
                frame.sample_rate = sample_rate
                out.mux(sound.encode(frame))
            out.mux(sound.encode())
    return path


def index_clip(n, height, width, bits=10, seed=0):
    """uint8 (n, height, width, 3): a smooth random picture whose frame i carries i in binary as `bits` black or
    white blocks along its top eighth (read back with clip_index), so a test or a benchmark can tell which frame
    a decoder returned after lossy compression."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((9, 12, 3)) * 120 + 60).astype(np.uint8)                 # upsampled: compressible
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    out = np.repeat(base[None], n, axis=0)
    bw = width // bits
    for i in range(n):
        out[i, :, :, 0] = (base[:, :, 0].astype(np.int64) + 3 * i) % 256      # the picture changes too
        for b in range(bits):
            out[i, : height // 8, b * bw:(b + 1) * bw] = 255 if (i >> b) & 1 else 0
    return out


def clip_index(frame, bits=10):
    """The frame index index_clip wrote into a (H, W, 3) frame (at any size: the blocks scale with it)."""
    H, W = frame.shape[:2]
    cols = np.linspace(0, W, bits + 1)
    return sum(1 << b for b in range(bits)
               if frame[: max(1, H // 10), int(cols[b]) + 1:max(int(cols[b]) + 2, int(cols[b + 1]) - 1)].mean() > 127)


def cache_short_side(img_size, crop_scale):
    """The short side (pixels) the frame cache keeps for a dataset: the transform's smallest crop (area
    fraction s = crop_scale[0], aspect 3/4) has both sides at least sqrt(0.75 s) x the frame's short side,
    so a short side of img_size / sqrt(0.75 s) keeps every crop at >= img_size pixels (to rounding): a
    crop is still only ever downscaled to img_size, as from the full-size frame. s is capped at the
    official 0.5, so the eval sets and train sets (0.5-0.8 here) of a clip share one cache entry."""
    return math.ceil(img_size / math.sqrt(0.75 * min(crop_scale[0], 0.5)))


def shrink_frame(frame, short_side):
    """uint8 (H, W, 3) -> the frame with its short side at most `short_side`, aspect kept (antialiased
    bilinear, the filter of the transform's resize, in uint8); a frame that small already (ToyWorld's)
    is returned exactly as decoded."""
    H, W = frame.shape[:2]
    if min(H, W) <= short_side:
        return frame
    k = short_side / min(H, W)
    return np.asarray(Image.fromarray(frame).resize((max(1, round(W * k)), max(1, round(H * k))), Image.BILINEAR))


def is_frame_store(path):
    """A folder of frames, a GIF or a WebP (short clips stored frame by frame, ToyWorld's kind) or a single image
    (an official `image` record: one frame, repeated by the sampler), read by pillow, as against a video file,
    which is decoded at the sampled frames only and never cached whole."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in IMAGE_EXTS + (".gif",)


class FrameCache:
    """Decoded clips kept in memory, one store per process (each DataLoader worker fills its own):
    every frame of a frame-store clip (is_frame_store; a video file is read at its picked frames each time,
    which is fast: read_frames), shrunk by shrink_frame, while the store holds less than the budget; after
    that further clips are decoded each time (one note on stderr), and shrunk the same way, so that a
    sample never depends on which clips this process happened to cache first (resume stays exact)."""

    def __init__(self):
        self.clips, self.nbytes, self.full = {}, 0, False        # (path, short side) -> (frames, source (H, W))

    def frames(self, path, indices_fn, short_side, budget_mb):
        """read_frames through the cache -> (uint8 (T, h, w, 3), the (H, W) the video was decoded at)."""
        key = (str(path), short_side)
        if key not in self.clips:
            src = []                               # the source size, for the crop (video_transform's src_hw)
            if self.full or not is_frame_store(path):   # no room, or a video file: decode only the picked frames
                return read_frames(path, indices_fn, short_side=short_side, src_hw=src), tuple(src)
            frames = read_frames(path, lambda n: range(n), short_side=short_side, src_hw=src)
            if self.nbytes + frames.nbytes > budget_mb * 2 ** 20:
                self.full = True
                print(f"frame cache: the {budget_mb} MB budget is reached in this process ({len(self.clips)} "
                      f"clips cached); further clips are decoded each time", file=sys.stderr)
                return frames[indices_fn(len(frames))], tuple(src)
            self.clips[key] = frames, tuple(src)
            self.nbytes += frames.nbytes
        frames, src = self.clips[key]
        return frames[indices_fn(len(frames))], src


_FRAME_CACHE = FrameCache()


def frame_indices(n_total, n_frames, train, rng=None):
    """Segment sampling as the official loaders (MM/dataset/video_utils.py:50-75): split the video into n_frames equal
    segments and take a random frame of each (training) or the middle one (evaluation)."""
    out = []
    for s in range(n_frames):
        lo = min(n_total - 1, s * n_total // n_frames)
        hi = max(lo + 1, (s + 1) * n_total // n_frames)
        out.append(int(rng.integers(lo, hi)) if train else (lo + hi - 1) // 2)
    return out


def video_transform(frames, size, train, rng=None, scale=(0.5, 1.0), hflip=False, src_hw=None):
    """uint8 (T, H, W, 3) -> float (3, T, size, size), ImageNet-normalised. Training: one random
    resized crop (area fraction in `scale`, aspect 3/4..4/3) for the whole clip and an optional
    horizontal flip; evaluation: resize the whole frame to size x size (MM/dataset/__init__.py:89-154).
    src_hw: the (H, W) the video was decoded at, when the frames were downscaled since (the frame
    cache): the crop box is drawn at that size with the same random numbers and scaled to the frames,
    so a clip gets the same box, in relative terms, cached or not."""
    H, W = src_hw or frames.shape[1:3]
    if train and scale[0] < 1.0:
        for _ in range(10):
            area = H * W * rng.uniform(*scale)
            ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < w <= W and 0 < h <= H:
                top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                # source pixels -> stored pixels: the identity unless downscaled; then an edge moves by at
                # most half a stored pixel (at most half an output pixel: a crop spans >= size stored pixels
                # at cache_short_side), and the crop is resampled twice (shrink, then resize): a tiny
                # difference from the full-size path
                sy, sx = frames.shape[1] / H, frames.shape[2] / W
                t, lf = round(top * sy), round(left * sx)
                frames = frames[:, t:max(t + 1, round((top + h) * sy)), lf:max(lf + 1, round((left + w) * sx))]
                break
    # crop first, in uint8: only the crop is converted to float (the same values as converting first)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255  # (T, 3, h, w)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if train and hflip and rng.random() < 0.5:
        x = x.flip(-1)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()         # (3, T, size, size)


# ------------------------------------------------------------------------------------------------
# dataset, collate, sampler

TEXT_KEYS = ("caption", "audio_caption", "asr", "avs_caption")


FRAME_CACHE = {"auto": None, "on": True, "off": False}     # the stage scripts' --frame_cache -> VideoTextDataset(cache=)


class VideoTextDataset(torch.utils.data.Dataset):
    """Reads the JSONL format. Item (index or (index, epoch)) -> dict with
    video (3, T, S, S), idx, id, n_bad, the text fields present, attrs/qa when present, and
    mask_noise (T', Np) uniform noise for the masking generators when `noise_grid` is given.
    A sample that cannot be read raises DataError naming the JSONL line and the file; with
    skip_bad it is replaced by the next readable sample and counted in n_bad.

    cache: keep decoded clips in this process's memory (FrameCache), True / False, or None = auto: on
    for up to 5000 clips (ToyWorld: 120 MB), where a worker revisits its clips every epoch. Cached
    clips are stored shrunk to cache_short_side(img_size, crop_scale) on the short side (frames that
    small, like ToyWorld's, exactly as decoded, so results are bit-identical with the cache off), up
    to cache_mb per process (x workers x ranks); beyond it clips are decoded each time. Uncached clips (video
    files always: read_frames decodes only the picked frames) are shrunk the same way as they are decoded, so
    cache on and off give the same pixels; against decoding at full size, shrinking first is a tiny resampling
    difference (see video_transform).

    All randomness of a sample (frame choice, crop, flip, mask noise) comes from a generator seeded
    by (seed, epoch, index), so a sample is the same whatever the worker, rank or world size, and a
    resumed run reads exactly what the uninterrupted run would have."""

    def __init__(self, jsonl, num_frames, img_size, train, seed=0, skip_bad=False, noise_grid=None,
                 crop_scale=(0.5, 1.0), hflip=False, extra=None, cache=None, cache_mb=2048, data_root=None):
        self.records, self.n_bad_lines = load_jsonl(jsonl, skip_bad, data_root=data_root)
        if not train:             # a caption list (MSR-VTT's): each caption its own text, the clip their positive
            each = lambda r: [dict(r, caption=c) for c in r["caption"]] if isinstance(r.get("caption"), list) else [r]
            self.records = [one for r in self.records for one in each(r)]
        self.cache = len(self.records) <= 5000 if cache is None else bool(cache)
        self.cache_mb = cache_mb
        self.jsonl, self.num_frames, self.img_size, self.train = str(jsonl), num_frames, img_size, train
        self.seed, self.skip_bad, self.noise_grid = seed, skip_bad, noise_grid
        self.crop_scale, self.hflip = tuple(crop_scale), hflip
        self.extra = extra            # optional fn(record, rng) -> dict of more fields (stage 2 audio)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        idx, epoch = item if isinstance(item, tuple) else (item, 0)
        n_bad = 0
        for attempt in range(len(self.records)):
            j = (idx + attempt) % len(self.records)      # with skip_bad, a bad sample -> the next one
            rec = self.records[j]
            rng = np.random.default_rng([self.seed, epoch, j])
            try:
                out = self._load(rec, rng)
            except DataError as e:
                msg = f"{self.jsonl}:{rec['_line']}: {e}"
                if not self.skip_bad:
                    raise DataError(msg) from None
                print(f"skipping bad sample: {msg}", file=sys.stderr)
                n_bad += 1
                continue
            out.update(idx=j, n_bad=n_bad)
            return out
        raise DataError(f"{self.jsonl}: no sample could be read")

    def _load(self, rec, rng):
        path, pick = Path(rec["_root"]) / rec["video"], lambda n: frame_indices(n, self.num_frames, self.train, rng)
        if rec.get("video_start_frame") is not None:    # a clip of a longer video (the official read_clip_from_video)
            lo = int(rec["video_start_frame"])
            pick = lambda n: [lo + i for i in frame_indices(min(n - 1, int(rec.get("video_end_frame", n - 1))) - lo
                                                            + 1, self.num_frames, self.train, rng)]
        # VideoChat2's `start` / `end`, in seconds: a part of a video file (a frame store has no frame rate)
        seconds = (rec["start"], rec["end"]) if rec.get("start") is not None and rec.get("end") is not None else None
        if self.cache and seconds is None:     # the short side follows crop_scale at call time (a caller may change it)
            frames, src_hw = _FRAME_CACHE.frames(path, pick, cache_short_side(self.img_size, self.crop_scale),
                                                 self.cache_mb)
        else:
            src = []
            frames = read_frames(path, pick, short_side=cache_short_side(self.img_size, self.crop_scale), src_hw=src,
                                 seconds=seconds)
            src_hw = tuple(src)
        out = {"video": video_transform(frames, self.img_size, self.train, rng, self.crop_scale, self.hflip, src_hw),
               "id": str(rec.get("id", rec["_line"]))}
        if self.extra is not None:
            out.update(self.extra(rec, rng))
        for k in TEXT_KEYS + ("attrs", "qa"):
            if k in rec:
                out[k] = rec[k]
        if self.noise_grid is not None:
            out["mask_noise"] = torch.from_numpy(rng.random(self.noise_grid, dtype=np.float32))
        return out


def collate(batch):
    """Stack tensors, list everything else; n_bad sums the bad samples skipped to fill the batch
    (a bad sample is replaced by the next good one, so batches keep their size across ranks)."""
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch if k in b]
        if len(vals) != len(batch):
            continue
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else (
            torch.tensor(vals) if isinstance(vals[0], int) else vals)
    out["n_bad"] = int(out["n_bad"].sum()) if "n_bad" in out else 0
    return out


class StepSampler(torch.utils.data.Sampler):
    """Batch sampler for training: yields this rank's micro-batches of (index, epoch), forever,
    starting at global micro-step `start`. Micro-step s reads positions [s*G, (s+1)*G) of the
    permutation for epoch s // (n // G), G = micro_batch * world; rank r takes its slice
    [r*micro, (r+1)*micro). The data position is the micro-step counter alone, so resume is exact,
    and 1 rank at micro-batch 2B reads the same clips as 2 ranks at B (the DDP equality test)."""

    def __init__(self, n, micro_batch, rank=0, world=1, seed=0, start=0, shuffle=True):
        self.n, self.micro, self.rank, self.world = n, micro_batch, rank, world
        self.seed, self.start, self.shuffle = seed, start, shuffle
        self.per_epoch = n // (micro_batch * world)
        if self.per_epoch == 0:
            raise DataError(f"the dataset has {n} samples, fewer than one global micro-batch "
                            f"({micro_batch} x {world} ranks)")

    def __iter__(self):
        s, epoch, perm = self.start, -1, None
        G = self.micro * self.world
        while True:
            e, pos = divmod(s, self.per_epoch)
            if e != epoch:
                epoch = e
                g = torch.Generator().manual_seed(self.seed * 100003 + e)
                perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            lo = pos * G + self.rank * self.micro
            yield [(int(i), e) for i in perm[lo:lo + self.micro]]
            s += 1

    def __len__(self):
        return sys.maxsize


def train_loader(dataset, micro_batch, rank, world, seed, start, workers):
    sampler = StepSampler(len(dataset), micro_batch, rank, world, seed, start)
    # its own generator: iter() draws the workers' base seed from it, not from the global RNG that --resume has
    # just restored (drawing there shifted every later mask and drop-path decision of a resumed run)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed),
                                       collate_fn=collate, persistent_workers=False,
                                       pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)


def eval_loader(dataset, batch_size, rank=0, world=1, workers=0):
    """Sequential loader over this rank's shard (indices rank, rank + world, ...)."""
    idx = list(range(rank, len(dataset), world))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate)


# ------------------------------------------------------------------------------------------------
# text: a WordPiece tokenizer that reads a standard BERT vocab.txt (MM/tasks/shared_utils.py:64-65)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _is_punct(ch):
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def _is_cjk(cp):
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def basic_tokenize(text, lowercase=True):
    """BERT's basic tokenizer: drop control characters, isolate CJK characters, split on whitespace,
    lower-case and strip accents (uncased), split off every punctuation character."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        chars.append(f" {ch} " if _is_cjk(cp) else (" " if ch.isspace() else ch))
    out = []
    for word in "".join(chars).split():
        if lowercase:
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        piece = ""
        for ch in word:
            if _is_punct(ch):
                out += [piece] if piece else []
                out.append(ch)
                piece = ""
            else:
                piece += ch
        out += [piece] if piece else []
    return out


class WordPieceTokenizer:
    """Uncased BERT tokenisation: basic_tokenize, then greedy longest-match-first WordPiece with `##`
    continuation pieces; a word with no segmentation (or over 100 characters) becomes [UNK]."""

    def __init__(self, vocab_file, lowercase=True):
        path = Path(vocab_file)
        if not path.exists():
            raise DataError(f"vocabulary {path} does not exist")
        self.itos = [line.rstrip("\n") for line in open(path, encoding="utf-8")]
        self.vocab = {tok: i for i, tok in enumerate(self.itos)}
        missing = [t for t in SPECIALS if t not in self.vocab]
        if missing:
            raise DataError(f"vocabulary {path} lacks the special tokens {missing}")
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in SPECIALS)

    def __len__(self):
        return len(self.itos)

    def wordpiece(self, word):
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = ("##" if start else "") + word[start:end]
                if sub in self.vocab:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(sub)
            start = end
        return pieces

    def tokenize(self, text):
        return [p for w in basic_tokenize(text, self.lowercase) for p in self.wordpiece(w)]

    def encode(self, texts, max_len):
        """list of str -> ids (B, max_len) as [CLS] tokens [SEP] [PAD]..., and the 1/0 padding mask."""
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for b, t in enumerate(texts):
            toks = [self.cls_id] + [self.vocab[p] for p in self.tokenize(t)][:max_len - 2] + [self.sep_id]
            ids[b, :len(toks)] = torch.tensor(toks)
        return ids, (ids != self.pad_id).long()

    def decode(self, ids, specials=SPECIALS):
        words = []
        for tok in (self.itos[int(i)] for i in ids):
            if tok.startswith("##") and words:
                words[-1] += tok[2:]
            elif tok not in specials:
                words.append(tok)
        return " ".join(words)


def build_vocab(texts, path):
    """A WordPiece vocabulary for a small corpus: the specials, every word seen, and every character
    (as itself and as a `##` continuation) so that unseen words still split into known pieces."""
    words, chars = set(), set()
    for t in texts:
        for w in basic_tokenize(t):
            words.add(w)
            chars.update(w)
    vocab = SPECIALS + sorted(words) + sorted(chars - words) + sorted("##" + c for c in chars)
    Path(path).write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# audio: Kaldi-compatible fbank in torch, reading and resampling (MM/dataset/av_utils.py:100-126)

def _mel_banks(n_mels, n_fft, sr, low_freq=20.0, high_freq=0.0):
    """Kaldi's triangular filters, equally spaced on the mel scale 1127 ln(1 + f/700): (n_mels, n_fft//2)."""
    mel = lambda f: 1127.0 * torch.log1p(f / 700.0)
    high = high_freq if high_freq > 0 else sr / 2 + high_freq
    lo, hi = mel(torch.tensor(low_freq)), mel(torch.tensor(high))
    delta = (hi - lo) / (n_mels + 1)
    b = torch.arange(n_mels)[:, None].float()
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    f = mel(sr / n_fft * torch.arange(n_fft // 2).float())[None]
    return torch.clamp(torch.minimum((f - left) / (center - left), (right - f) / (right - center)), min=0)


def kaldi_fbank(wave, sr=16000, n_mels=64, frame_ms=25.0, shift_ms=10.0):
    """Log mel filterbank energies exactly as Kaldi / torchaudio.compliance.kaldi.fbank with its
    defaults: frames of 25 ms every 10 ms (edges snipped), DC offset removed, pre-emphasis 0.97, a
    Povey window (Hann^0.85), zero-padded to a power-of-two FFT, power spectrum, mel filters from 20 Hz
    to Nyquist, natural log floored at float32 eps. wave: (N,) float -> (frames, n_mels) float32."""
    wave = wave.float()
    size, shift = int(sr * frame_ms / 1000), int(sr * shift_ms / 1000)
    if wave.numel() < size:
        raise DataError(f"audio of {wave.numel()} samples is shorter than one {frame_ms:.0f} ms frame")
    n_fft = 1 << (size - 1).bit_length()
    frames = wave.unfold(0, size, shift)                                    # (m, size), snip_edges
    frames = frames - frames.mean(1, keepdim=True)
    frames = frames - 0.97 * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(size, periodic=False).pow(0.85)
    power = torch.fft.rfft(F.pad(frames, (0, n_fft - size))).abs().pow(2)   # (m, n_fft/2 + 1)
    mel = power[:, :-1] @ _mel_banks(n_mels, n_fft, sr).t()                 # Nyquist bin has no filter
    return torch.log(mel.clamp_min(torch.finfo(torch.float32).eps))


def resample(wave, sr_in, sr_out):
    """Band-limited resampling of a (N,) signal by truncating or zero-padding its spectrum."""
    n_out = int(round(wave.numel() * sr_out / sr_in))
    spec = torch.fft.rfft(wave.double())
    keep = min(spec.numel(), n_out // 2 + 1)
    out = torch.zeros(n_out // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    return (torch.fft.irfft(out, n=n_out) * n_out / wave.numel()).float()


def _wav_missing_bytes(path):
    """How many bytes a RIFF/WAVE file's data chunk declares beyond the end of the file (0 when complete,
    not a WAV, or of unknown length: streamed WAVs declare 0 or 0xFFFFFFFF)."""
    with open(path, "rb") as f:
        head, size = f.read(12), path.stat().st_size
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        while len(chunk := f.read(8)) == 8:
            n = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                return max(0, n - (size - f.tell())) if n not in (0, 0xFFFFFFFF) else 0
            f.seek(n + (n & 1), 1)                                          # chunks are padded to even size
    return 0


FBANK_MEAN, FBANK_STD = 15.41663, 6.55582      # InternVideo2's normalisation (MM/dataset/av_utils.py:117-119)


def load_fbank(path, frames, train, rng=None, sr=16000, allow_resample=False, n_mels=64):
    """Audio file -> normalised fbank (frames, n_mels), as the official loader: mono, 16 kHz, a crop
    of frames x 10 ms (random in training, from the start otherwise), x 2^15, Kaldi fbank,
    (x - 15.41663) / (2 * 6.55582), zero-padded to `frames`. Other sample rates are resampled when
    allowed, else refused with a message naming the file; so are a truncated file and NaN/inf samples."""
    import soundfile as sf
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: audio file does not exist")
    if path.suffix.lower() not in SOUND_EXTS:          # a video file's sound track, as the official reads it
        wave = read_audio_from_video(path, sr)
        return _fbank_crop(wave, frames, train, rng, sr, n_mels)
    try:
        with sf.SoundFile(str(path)) as f:
            declared, file_sr, wave = f.frames, f.samplerate, f.read(dtype="float32", always_2d=True)
    except Exception as e:
        raise DataError(f"{path}: cannot read audio ({type(e).__name__}: {e})") from None
    # a cut-off file: libsndfile shortens a WAV's frame count to what is there (so sf.info agrees with
    # sf.read) and only logs it, hence the header check; other formats may just return fewer frames
    short = _wav_missing_bytes(path)
    if short or len(wave) < declared:
        raise DataError(f"{path}: truncated audio file (" + (f"{short} bytes of the data chunk missing)" if short
                        else f"{len(wave)} of {declared} frames readable)"))
    if not np.isfinite(wave).all():        # a float WAV can hold NaN/inf: it would surface as a NaN loss
        raise DataError(f"{path}: non-finite samples (NaN or inf) in the audio")
    wave = torch.from_numpy(wave).mean(1)                                   # mono
    if file_sr != sr:
        if not allow_resample:
            raise DataError(f"{path}: sample rate {file_sr} Hz, the audio pipeline needs {sr} Hz; resample the "
                            f"file (ffmpeg -i in -ar {sr} out.wav) or pass --resample_audio=True")
        wave = resample(wave, file_sr, sr)
    return _fbank_crop(wave, frames, train, rng, sr, n_mels)


def _fbank_crop(wave, frames, train, rng, sr, n_mels):
    """(N,) mono at sr -> the normalised fbank of a `frames` x 10 ms crop, zero-padded (load_fbank's end)."""
    max_len = (frames - 1) * (sr // 100) + sr * 25 // 1000                  # samples giving `frames` frames
    if wave.numel() > max_len:
        start = int(rng.integers(0, wave.numel() - max_len + 1)) if train else 0
        wave = wave[start:start + max_len]
    if wave.numel() < sr * 25 // 1000:
        wave = F.pad(wave, (0, sr * 25 // 1000 - wave.numel()))
    fb = (kaldi_fbank(wave * 2 ** 15, sr, n_mels) - FBANK_MEAN) / (2 * FBANK_STD)
    return F.pad(fb, (0, 0, 0, frames - fb.shape[0]))


SOUND_EXTS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif")     # read by soundfile; anything else by PyAV


def read_audio_from_video(path, sr=16000):
    """The sound track of a video file (mp4, webm, mkv, ...) -> float32 (N,) mono at sr, through PyAV: channels
    averaged and resampled to sr, as the official loader for lines without an audio file
    (`load_full_audio_av`, MM/dataset/av_utils.py:128-176: mean of two channels at :154, resampling at :160;
    enabled per dataset by `read_audio_from_video`, MM/dataset/pt_dataset.py:284, 314-318). Raises DataError
    naming the file when there is no sound track."""
    try:
        import av
    except ImportError:
        raise DataError(f"{path}: reading sound from {Path(path).suffix} files needs PyAV (pip install av)") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"{path}: no sound track in the video (give the line an 'audio' file)")
            stream = container.streams.audio[0]
            file_sr = stream.rate
            # planar float, one row per channel; packed formats come back as (1, N * channels)
            chunks = [f.to_ndarray().reshape(len(f.layout.channels), -1) if f.format.is_planar
                      else f.to_ndarray().reshape(-1, len(f.layout.channels)).T for f in container.decode(stream)]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read its sound ({type(e).__name__}: {e})") from None
    if not chunks:
        raise DataError(f"{path}: the sound track holds no samples")
    wave = np.concatenate(chunks, axis=1).astype(np.float32)
    if np.issubdtype(chunks[0].dtype, np.integer):                 # s16 / s32 -> [-1, 1]
        wave /= float(np.iinfo(chunks[0].dtype).max)
    wave = torch.from_numpy(wave).mean(0)
    return resample(wave, file_sr, sr) if file_sr != sr else wave


def positive_id(rec, caption_key):
    """The id that makes two samples positives of each other for a caption type: the sample itself
    (its `id`), as the official's dataset index; on ToyWorld, the attributes that caption type
    describes, since its clips repeat attribute sets and a clip with the same description is no
    negative (multi-positive targets from sample ids: MM/models/criterions.py:201-216). A stable int64 hash."""
    attrs = rec.get("attrs")
    if attrs and caption_key in CAPTION_ATTRS:
        key = "|".join(str(attrs[a]) for a in CAPTION_ATTRS[caption_key])
    else:
        key = f"{rec.get('_root')}|{rec.get('id', rec.get('_line'))}"
    return zlib.crc32(key.encode())


def stage2_fields(tokenizer, caption_keys, max_len, audio_frames=0, train=True, allow_resample=False,
                  audio_from_video=False):
    """The dataset's `extra` for stage 2: every caption type a loss needs, tokenised (ids_<key>,
    mask_<key>) with its positive id (pos_<key>), and the audio fbank when audio_frames > 0: from the line's
    `audio` file, or, for a line without one and audio_from_video, from the video file's sound track (the
    official `read_audio_from_video`). A missing caption raises DataError."""
    def extra(rec, rng):
        out = {}
        for key in caption_keys:
            text = rec.get(key)
            if isinstance(text, list) and text:    # several captions: one per sample, drawn (official "uniform")
                text = text[int(rng.integers(len(text)))] if train else text[0]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"empty or missing {key!r}")
            ids, mask = tokenizer.encode([text], max_len)
            out[f"ids_{key}"], out[f"mask_{key}"], out[f"pos_{key}"] = ids[0], mask[0], positive_id(rec, key)
        if audio_frames:
            if not rec.get("audio") and not audio_from_video:
                raise DataError("no 'audio' field, but an audio loss is enabled (--audio_from_video=True reads "
                                "the video file's sound)")
            out["fbank"] = load_fbank(Path(rec["_root"]) / (rec.get("audio") or rec["video"]), audio_frames, train,
                                      rng, allow_resample=allow_resample)
        return out
    return extra


# ------------------------------------------------------------------------------------------------
# stage 3: LLM tokenizers (one small interface) and the instruction format (VC2/dataset/it_dataset_mistral.py:74-104)

class ToyLLMTokenizer:
    """The toy LLM's tokenizer: the data's WordPiece vocabulary plus the LLM specials, with the chat
    tags as single tokens. Every LLM tokenizer offers the same small interface: encode(text) -> ids
    without BOS/EOS, decode(ids) -> text, bos_id, eos_id, pad_id, len()."""

    SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<Video>", "</Video>"]

    def __init__(self, vocab_file):
        self.wp = WordPieceTokenizer(vocab_file)
        self.itos = self.SPECIALS + [t for t in self.wp.itos if t not in SPECIALS]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = 0, 1, 2, 3

    def __len__(self):
        return len(self.itos)

    def encode(self, text):
        ids = []
        for part in re.split(r"(\[INST\]|\[/INST\]|<Video>|</Video>|</s>|<s>)", text):
            if part in self.stoi and part in self.SPECIALS:
                ids.append(self.stoi[part])
            elif part.strip():
                ids += [self.stoi.get(p, self.unk_id) for p in self.wp.tokenize(part)]
        return ids

    def decode(self, ids):
        text = WordPieceTokenizer.decode(self, ids, self.SPECIALS)          # the same ## joining
        return text.replace(" .", ".").replace(" ?", "?").replace(" ,", ",")


class SentencePieceTokenizer:
    """A real LLM's SentencePiece model (Mistral, LLaMA: tokenizer.model); needs `pip install sentencepiece`."""

    def __init__(self, model_file):
        try:
            import sentencepiece
        except ImportError:
            raise DataError("this LLM tokenizer needs SentencePiece: pip install sentencepiece") from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def __len__(self):
        return self.sp.get_piece_size()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer:
    """A tiktoken encoding (e.g. cl100k_base); needs `pip install tiktoken`. BOS/EOS are its end-of-text."""

    def __init__(self, name):
        try:
            import tiktoken
        except ImportError:
            raise DataError("this LLM tokenizer needs tiktoken: pip install tiktoken") from None
        self.enc = tiktoken.get_encoding(name)
        self.bos_id = self.eos_id = self.pad_id = self.enc.eot_token

    def __len__(self):
        return self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


def load_llm_tokenizer(spec):
    """'toy:<vocab.txt>' | 'sentencepiece:<tokenizer.model>' | 'tiktoken:<encoding name>'."""
    kind, _, arg = spec.partition(":")
    table = {"toy": ToyLLMTokenizer, "sentencepiece": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer}
    if kind not in table or not arg:
        raise DataError(f"LLM tokenizer {spec!r}: use toy:<vocab.txt>, sentencepiece:<file> or tiktoken:<name>")
    return table[kind](arg)


CHAT_HEAD = "[INST] <Video>"


def video_index(tok):
    """Where the visual embeddings start in every conversation: after BOS and the chat head."""
    return 1 + len(tok.encode(CHAT_HEAD))


def build_chat(tok, turns, n_visual, max_len):
    """The VideoChat2 instruction format (VC2/dataset/it_dataset_mistral.py:74-104), visual embeddings after <Video>:
        <s> [INST] <Video> {n_visual slots} </Video> [/INST] ( [INST] q [/INST] a </s>)*
    turns: [(question, answer)]. Returns ids (max_len,), labels (max_len,) with -100 everywhere but
    the answer tokens and their </s>, mask (max_len,), and the index of the first visual slot. The
    visual slots hold pad ids: the model overwrites their embeddings."""
    head = [tok.bos_id] + tok.encode(CHAT_HEAD)
    ids = head + [tok.pad_id] * n_visual + tok.encode("</Video> [/INST]")
    labels = [-100] * len(ids)
    for q, a in turns:
        prompt = tok.encode(f" [INST] {q} [/INST]")
        answer = (tok.encode(f" {a}") + [tok.eos_id]) if a is not None else []
        ids += prompt + answer
        labels += [-100] * len(prompt) + answer
    if len(ids) > max_len:
        raise DataError(f"conversation of {len(ids)} tokens exceeds --max_llm_len={max_len}")
    pad = max_len - len(ids)
    t = lambda x, fill: torch.tensor(x + [fill] * pad, dtype=torch.long)
    return t(ids, tok.pad_id), t(labels, -100), t([1] * len(ids), 0), len(head)


def stage3_turns(rec, substage, rng):
    """The conversation a sample gives each sub-stage, as [(question, answer)]: the caption with a
    captioning instruction for alignment and the vision-language connection; for instruction tuning
    the sample's `conversations` (all turns) when it has them, else one random QA pair or the caption."""
    caption = rec.get("caption", "")
    if isinstance(caption, list) and caption:              # a caption list: one drawn per sample
        caption = caption[int(rng.integers(len(caption)))]
    describe = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
    if substage == 3 and rec.get("conversations"):        # VideoChat2's files have no caption, only QA turns
        try:
            turns = [(t["q"], t["a"]) for t in rec["conversations"]]
        except (KeyError, TypeError):
            raise DataError("'conversations' must be a list of {\"q\": ..., \"a\": ...}") from None
        if rec.get("instruction"):     # VideoChat2 puts it before the video; here it leads the first question, so
            turns[0] = (f"{rec['instruction']} {turns[0][0]}", turns[0][1])   # every sample's slots stay in place
        return turns
    if not isinstance(caption, str) or not caption.strip():
        raise DataError("empty or missing 'caption'")
    if substage in (1, 2):
        return [(describe, caption)]
    options = [(describe, caption)] + [(qa["q"], qa["a"]) for qa in rec.get("qa", [])]
    return [options[int(rng.integers(len(options)))]]


def stage3_fields(llm_tok, bert_tok, substage, n_visual, max_llm_len, max_text_len):
    """The dataset's `extra` for stage 3: the first instruction (BERT-tokenised, for the Q-Former), the
    whole conversation (LLM-tokenised) of this sample's task, and the caption for sub-stage 1."""
    def extra(rec, rng):
        turns = stage3_turns(rec, substage, rng)
        ids, labels, mask, _ = build_chat(llm_tok, turns, n_visual, max_llm_len)
        qf_ids, qf_mask = bert_tok.encode([turns[0][0]], max_text_len)       # the Q-Former reads the first question
        cap_ids, cap_mask = bert_tok.encode([rec["caption"]], max_text_len)
        return {"llm_ids": ids, "llm_labels": labels, "llm_mask": mask, "qf_ids": qf_ids[0], "qf_mask": qf_mask[0],
                "ids_caption": cap_ids[0], "mask_caption": cap_mask[0], "pos_caption": positive_id(rec, "caption")}
    return extra


def toyworld_as_videos(root, suffix=".mp4", fps=8):
    """Turn a ToyWorld folder into the layout of a folder of real videos: each clip a video file (its 16 frames at
    `fps`, its sound as the file's audio track), lines without `audio` (stage 2 reads the sound from the video with
    --audio_from_video=True) and with a `label`, the clip's motion ("moving left"), for `evaluate.py probe`.
    The WebP and FLAC files are removed. For trying the "your own videos" commands without videos of your own."""
    import soundfile as sf
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("as_videos") == suffix:
        return root
    for split in ("train", "val"):
        lines = []
        for rec in load_jsonl(root / f"{split}.jsonl")[0]:
            frames = read_frames(root / rec["video"], lambda n: range(n))
            wave, sr = sf.read(root / rec["audio"], dtype="float32")
            video = Path(rec["video"]).with_suffix(suffix)
            write_video(root / video, frames, fps=fps, audio=wave, sample_rate=sr)
            (root / rec["video"]).unlink()
            (root / rec.pop("audio")).unlink()
            rec.update(video=str(video), label=f"moving {rec['attrs']['direction']}")
            lines.append(json.dumps({k: v for k, v in rec.items() if not k.startswith("_")}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    if (root / "audio").is_dir() and not any((root / "audio").iterdir()):
        (root / "audio").rmdir()
    meta["as_videos"] = suffix
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write ToyWorld in the real JSONL format.")
    for name, default in (("out", "data/toyworld"), ("n_train", 2000), ("n_val", 500), ("seed", 0)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    p.add_argument("--as_videos", default="", help="also turn it into video files with this suffix (.mp4, .webm, "
                   ".mkv): the layout of a folder of your own videos, sound in the files, a `label` per line")
    a = p.parse_args()
    import time
    t0 = time.time()
    root = make_toyworld(a.out, a.n_train, a.n_val, a.seed)
    if a.as_videos:
        toyworld_as_videos(root, "." + a.as_videos.lstrip("."))
    print(f"ToyWorld at {root} ({a.n_train} train + {a.n_val} val clips{' as ' + a.as_videos if a.as_videos else ''})"
          f" in {time.time() - t0:.1f}s")
