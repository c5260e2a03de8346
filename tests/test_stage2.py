"""Stage 2: tokenizer, fbank, audio input checks, text/audio encoders and their checkpoint layouts,
matching negatives, MLM masking, the causal variant, the stage-1 hand-off, a short run, torchrun."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_picture
from data import DataError, WordPieceTokenizer, kaldi_fbank, load_fbank, resample
from losses import captioning_loss, hard_negatives, mask_tokens, matching_loss
from checkpoints import bert_key_map, load_beats, load_bert
from model import (AudioEncoder, InternVideo2, Stage2Model, TextEncoder, audio_preset, count_params, text_preset,
                   vision_preset)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "the",
                               "dog", ",", "runs", "run", "##s", "cafe"]) + "\n")
    return WordPieceTokenizer(path)


def test_wordpiece_on_a_known_vocab(vocab):
    assert vocab.tokenize("UnAffable, the DOG runs!") == ["un", "##aff", "##able", ",", "the", "dog", "runs", "[UNK]"]
    assert vocab.tokenize("Café dogs") == ["cafe", "dog", "##s"]       # accents stripped, sub-words
    assert vocab.tokenize("runs runss") == ["runs", "runs", "##s"]   # greedy longest match first
    ids, mask = vocab.encode(["the dog", "unaffable runs the dog ,"], max_len=6)
    assert ids.tolist() == [[2, 8, 9, 3, 0, 0], [2, 5, 6, 7, 11, 3]]    # [CLS] ... [SEP] [PAD], truncated
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert vocab.decode(ids[1]) == "unaffable runs"


def _fixed_signal():
    t = torch.arange(4000) / 16000
    wave = (0.3 * torch.sin(2 * math.pi * 440 * t) + 0.2 * torch.sin(2 * math.pi * 3000 * t)
            + 0.1 * torch.sin(2 * math.pi * (200 + 2000 * t) * t) + 0.05 * torch.sin(12345.678 * t * t * 1000))
    return (wave * 2 ** 15).float()


def test_fbank_equals_kaldi():
    """Reference values from torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=64,
    sample_frequency=16000, frame_length=25, frame_shift=10) (torchaudio 2.9.1), and the library
    itself when it is installed."""
    fb = kaldi_fbank(_fixed_signal())
    assert fb.shape == (23, 64)
    expected = torch.tensor([[10.078968, 19.667847, 18.149637, 19.051487, 21.005396, 22.221725],
                             [12.420353, 11.603579, 14.477592, 18.903973, 22.079969, 23.167061],
                             [12.957582, 14.632671, 17.167356, 19.577642, 21.528182, 22.609144]])
    torch.testing.assert_close(fb[[0, 7, 22]][:, [0, 5, 17, 31, 48, 63]], expected, atol=2e-4, rtol=0)
    assert abs(float(fb.sum()) - 29160.7734) < 0.5
    try:
        import torchaudio
    except ImportError:
        return
    ref = torchaudio.compliance.kaldi.fbank(_fixed_signal()[None], num_mel_bins=64, sample_frequency=16000,
                                            frame_length=25, frame_shift=10)
    torch.testing.assert_close(fb, ref, atol=2e-4, rtol=0)


def test_audio_sample_rate_is_refused_or_resampled(tmp_path):
    import soundfile as sf
    t = np.arange(8000) / 8000
    sf.write(tmp_path / "a.wav", (0.5 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 8000)
    with pytest.raises(DataError, match=r"a\.wav: sample rate 8000 Hz.*--resample_audio"):
        load_fbank(tmp_path / "a.wav", 98, train=False)
    fb = load_fbank(tmp_path / "a.wav", 98, train=False, allow_resample=True)
    assert fb.shape == (98, 64) and torch.isfinite(fb).all()
    up = resample(torch.from_numpy(np.sin(2 * np.pi * 500 * t)).float(), 8000, 16000)   # a 500 Hz tone stays 500 Hz
    assert up.numel() == 16000 and int(torch.fft.rfft(up).abs().argmax()) == 500
    with pytest.raises(DataError, match="missing.wav: audio file does not exist"):
        load_fbank(tmp_path / "missing.wav", 98, train=False)


def _text(**kw):
    torch.manual_seed(0)
    return TextEncoder(text_preset("toy", vocab_size=50, **kw)).eval()


def test_text_only_forward_never_touches_the_fusion_layers():
    enc = _text()
    ids = torch.randint(5, 50, (2, 7))
    enc.forward_text(ids, torch.ones_like(ids))[:, 0].sum().backward()
    fusion = [p for i, l in enumerate(enc.layers) if i >= enc.cfg.fusion_layer for p in l.parameters()]
    assert fusion and all(p.grad is None for p in fusion)
    assert all(p.grad is not None for p in enc.layers[0].parameters())


def test_causal_variant_never_sees_the_future():
    enc = _text()
    ids = torch.randint(5, 50, (1, 8))
    mask, memory = torch.ones_like(ids), torch.randn(1, 5, enc.cfg.cross_width)
    h = enc.forward_fusion(enc.forward_text(ids, mask, causal=True), mask, memory, causal=True)
    ids2 = ids.clone()
    ids2[0, 5:] = 7
    h2 = enc.forward_fusion(enc.forward_text(ids2, mask, causal=True), mask, memory, causal=True)
    torch.testing.assert_close(h[:, :5], h2[:, :5])
    assert not torch.allclose(h[:, 5:], h2[:, 5:])
    loss = captioning_loss(enc, ids, mask, memory)
    assert torch.isfinite(loss) and loss > 0


def test_bert_loads_from_hugging_face_names_and_reports_the_new_cross_attention():
    src, dst = _text(), _text()
    torch.manual_seed(5)
    for p in src.parameters():
        p.data.normal_()
    key_map = bert_key_map(src.cfg)
    official = {key_map[k]: v for k, v in src.state_dict().items() if k in key_map}
    assert "bert.encoder.layer.3.crossattention.self.key.weight" in official
    assert load_bert(dst, official) == []
    ids = torch.randint(5, 50, (2, 6))
    torch.testing.assert_close(dst.forward_text(ids, torch.ones_like(ids)), src.forward_text(ids, torch.ones_like(ids)))
    plain = {k: v for k, v in official.items() if "crossattention" not in k}     # a plain BERT checkpoint
    fresh = load_bert(_text(), plain)
    assert fresh and all(".cross" in k for k in fresh)
    with pytest.raises(KeyError, match="word_embeddings"):
        load_bert(_text(), {**plain, "bert.embeddings.word_embeddings.weight": torch.zeros(3, 3)})
    # the original bert-*-uncased files name LayerNorm's parameters gamma and beta, and may drop `bert.`
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
              .removeprefix("bert."): v for k, v in official.items()}
    assert sum(".gamma" in k for k in legacy) > 5
    dst = _text()
    assert load_bert(dst, legacy) == []
    torch.testing.assert_close(dst.mlm_logits(dst.forward_text(ids, torch.ones_like(ids))),
                               src.mlm_logits(src.forward_text(ids, torch.ones_like(ids))))


def test_bert_large_parameter_count_on_meta():
    with torch.device("meta"):
        enc = TextEncoder(text_preset("bert-large"))
    cross = sum(p.numel() for n, p in enc.named_parameters() if ".cross" in n)
    assert 334e6 < count_params(enc) - cross < 336e6           # BERT-large + MLM head, about 335M
    assert len(enc.layers) == 24 and sum(hasattr(l, "cross") for l in enc.layers) == 5


def _beats_official(encoder):
    """An AudioEncoder's state under the official BEATs names (MM/models/backbones/beats/backbone.py)."""
    official = {}
    for k, v in encoder.state_dict().items():
        k = k.replace("encoder.pos_conv.", "encoder.pos_conv.0.")
        if k == "encoder.relative_attention_bias.weight":
            for i in range(encoder.cfg.depth):                  # every layer carries the shared table
                official[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = v
            continue
        official[k] = v
    return official


def test_beats_loads_from_the_official_layout():
    torch.manual_seed(0)
    cfg = audio_preset("toy")
    src = AudioEncoder(cfg).eval()
    official = _beats_official(src)
    ck = {"cfg": {"encoder_embed_dim": cfg.dim, "encoder_layers": cfg.depth, "encoder_attention_heads": cfg.heads,
                  "encoder_ffn_embed_dim": cfg.mlp_dim, "embed_dim": cfg.patch_dim, "conv_pos": cfg.pos_conv,
                  "conv_pos_groups": cfg.pos_conv_groups, "num_buckets": cfg.num_buckets,
                  "max_distance": cfg.max_distance}, "model": official}
    loaded = load_beats(ck).eval()
    fbank = torch.randn(2, 98, 64)
    out = loaded(fbank)
    assert out.shape == (2, 24, cfg.dim)
    torch.testing.assert_close(out, src(fbank))
    # inside the 6B stage-2 file: under audio_encoder., no cfg (the base preset's shapes)
    inside = load_beats({f"audio_encoder.{k}": v for k, v in official.items()}, prefix="audio_encoder.", base="toy")
    torch.testing.assert_close(inside.eval()(fbank), src(fbank))
    # a cfg asking for what AudioEncoder does not build is refused by name, never half-loaded
    for key, value in (("layer_norm_first", True), ("conv_bias", True), ("activation_fn", "relu")):
        with pytest.raises(KeyError, match=f"{key}={value!r}"):
            load_beats({**ck, "cfg": {**ck["cfg"], key: value}})
    del official["encoder.layers.1.fc1.weight"]
    with pytest.raises(KeyError, match="encoder.layers.1.fc1.weight"):
        load_beats(ck)


def test_hard_negatives_are_never_positives():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    for _ in range(50):
        neg, valid = hard_negatives(torch.randn(8, 8) * 5, ids)
        assert valid.all() and torch.all(ids[neg] != ids)
    neg, valid = hard_negatives(torch.randn(3, 3), torch.tensor([7, 7, 7]))   # nothing but positives
    assert not valid.any()
    match = lambda s, m, mem: torch.stack([s.sum((1, 2)), mem.sum((1, 2))], 1)
    v = torch.randn(1, 4, requires_grad=True)
    loss = matching_loss(match, torch.randn(1, 3, 4), torch.ones(1, 3), torch.randn(1, 2, 4), v, torch.randn(1, 4),
                         0.07, torch.tensor([0]))                              # a batch of one: positives only
    assert torch.isfinite(loss)


def test_matching_gradients_are_the_same_every_run():
    """Hard negatives repeat rows; gathering them with x[idx] summed the repeats in a thread-dependent
    order on CPUs (stage 2 differed from run to run). The same step must give the same bits."""
    torch.manual_seed(0)
    memory, states = torch.randn(64, 33, 96, requires_grad=True), torch.randn(64, 5, 96, requires_grad=True)
    W = torch.randn(33, 96)
    match = lambda s, m, mem: torch.stack([s.sum((1, 2)), (mem * W).sum((1, 2))], 1)
    v_emb = torch.randn(64, 16)
    t_emb = v_emb[:1] + 0.01 * torch.randn(64, 16)            # clip 0 is every caption's hardest negative
    grads = []
    for _ in range(20):
        torch.manual_seed(1)                                   # the same negatives every time
        memory.grad = states.grad = None
        matching_loss(match, states, torch.ones(64, 5), memory, v_emb, t_emb, 0.07, torch.arange(64)).backward()
        grads.append(memory.grad.clone())
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_retrieval_recall_rerank_and_match_margins():
    from common import Runtime
    from evaluate import match_margins, recall_at_k, rerank
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1], [0.5, 0.6, 0.7]])
    gt = torch.tensor([[False, True, True], [False, True, False], [True, False, False]])
    r = recall_at_k(sim, gt, ks=(1, 2))                 # the best-ranked positive counts (FACTS 5.1)
    assert r[1] == pytest.approx(1 / 3) and r[2] == pytest.approx(2 / 3)
    # re-ranking rescores only each row's top k, by the matching score alone; the rest become -100
    calls = []
    score = lambda i, top: (calls.append((i, sorted(top.tolist()))), -top.float())[1]
    out = rerank(sim, 2, score, Runtime(torch.device("cpu"), torch.float32))
    assert calls == [(0, [0, 1]), (1, [0, 1]), (2, [1, 2])]
    assert out.tolist() == [[0.0, -1.0, -100.0], [0.0, -1.0, -100.0], [-100.0, -1.0, -2.0]]
    # margins: positives 1.0; candidates differing only in colour -1.0, only in direction 1.0
    recs = [{"attrs": {"shape": "circle", "color": c, "size": "small", "direction": d, "speed": "slowly"}}
            for c, d in (("red", "up"), ("red", "up"), ("blue", "up"), ("red", "down"))]
    gt = torch.tensor([[a["attrs"] == b["attrs"] for b in recs] for a in recs])
    scores = torch.tensor([[-1.0 if a["attrs"]["color"] != b["attrs"]["color"] else 1.0 for b in recs] for a in recs])
    m = match_margins(scores, gt, recs, "caption")
    assert m["color"] == pytest.approx(2.0) and m["direction"] == pytest.approx(0.0) and "shape" not in m


def test_mlm_masking_rates_and_never_masked_tokens():
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (400, 40))
    ids[:, 0] = 2                                                               # [CLS]
    pad = torch.ones_like(ids)
    pad[:, 30:] = 0
    ids[:, 30:] = 0                                                             # [PAD]
    out, labels = mask_tokens(ids, pad, 1000, mask_id=4, cls_id=2, prob=0.5)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 30:].any()                 # CLS and PAD never masked
    assert torch.equal(out[:, 0], ids[:, 0]) and torch.equal(out[:, 30:], ids[:, 30:])
    assert abs(picked[:, 1:30].float().mean().item() - 0.5) < 0.01
    n = picked.sum().item()
    became_mask = (out[picked] == 4).sum().item() / n
    unchanged = (out[picked] == ids[picked]).sum().item() / n
    assert abs(became_mask - 0.8) < 0.01 and abs(unchanged - 0.1) < 0.01       # so ~10% random tokens
    assert torch.equal(labels[picked], ids[picked])


def test_stage1_to_stage2_hand_off_loads_every_encoder_weight(tmp_path):
    from checkpoints import load_video_encoder
    from dataclasses import asdict
    torch.manual_seed(0)
    vcfg1 = vision_preset("toy")
    student = InternVideo2(vcfg1, with_heads=True)
    torch.save({"stage": 1, "model": student.state_dict(), "model_config": asdict(vcfg1)}, tmp_path / "s1.pt")
    model = Stage2Model(vision_preset("toy", num_frames=4), text_preset("toy", vocab_size=40), audio_preset("toy"), 96, 96)
    logged = []
    report = load_video_encoder(model, torch.load(tmp_path / "s1.pt", weights_only=False), log=logged.append)
    skipped = sorted(k for k in student.state_dict() if k not in model.vision_encoder.state_dict())
    assert report["skipped"] == skipped and "mae_decoder.*.norm.weight (x2)" in logged[0]   # every head, named
    assert report["fresh"] and not any(k.startswith("vision_encoder.") for k in report["fresh"])
    enc, src = model.vision_encoder.state_dict(), student.state_dict()
    for k, v in enc.items():
        if k != "pos_embed":
            assert torch.equal(v, src[k]), k
    t8 = src["pos_embed"][0, 1:].view(8, 16, -1)                  # 8 -> 4 frames: pairs averaged (linear)
    torch.testing.assert_close(enc["pos_embed"][0, 1:].view(4, 16, -1), (t8[0::2] + t8[1::2]) / 2)
    assert not any(k.startswith(("clip_decoder", "mae_decoder", "clip_pos_embed")) for k in enc)


def _stage2_args(toyworld, out, bert, *extra):
    return [f"--data={toyworld}", f"--out_dir={out}", f"--text_ckpt={bert}", "--batch_size=8", "--workers=0",
            "--log_every=1", "--warmup_steps=2", "--eval_batch=16", "--rerank_k=4", *extra]


def test_short_run_lowers_every_loss_term_and_evaluates(toyworld, toy_pretrained, tmp_path):
    from train_stage2 import main
    m = main(_stage2_args(toyworld, tmp_path, toy_pretrained["bert"], "--max_steps=40", "--lr=3e-3"))
    for name in ("vtc", "vtm", "mlm", "atc", "avtc", "avtm", "avmlm"):
        assert m[f"loss_last_{name}"] < m[f"loss_first_{name}"], (name, m)
    for key in ("t2v_r1", "v2t_r1", "t2v_r1_rerank", "v2t_r1_rerank", "t2a_r1", "t2av_r1", "zeroshot_cls_acc",
                "t2v_r1_chance", "t2a_r1_chance", "t2av_r1_chance", "zeroshot_cls_chance"):
        assert 0.0 <= m[key] <= 1.0, key
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("loss.png", "similarity.png"))
    for f in ("loss.png", "similarity.png"):
        assert_picture(tmp_path / f)
    # the evaluation command on that checkpoint: ToyWorld (audio, motion classes), then a folder of your own
    import evaluate
    out = evaluate.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--data={toyworld}", "--rerank_k=8"])
    for key in ("t2v_r1", "v2t_r10", "t2v_r1_rerank", "t2a_r1", "t2av_r1_rerank", "zeroshot_cls_acc"):
        assert 0.0 <= out[key] <= 1.0, key
    saved = json.loads((tmp_path / f"zeroshot_{toyworld.name}.json").read_text())
    assert saved["t2v_r1"] == out["t2v_r1"] and saved["rerank_k"] == 8
    mine = tmp_path / "mine"
    mine.mkdir()
    recs = [json.loads(line) for line in open(toyworld / "val.jsonl")][:8]
    (mine / "val.jsonl").write_text("".join(json.dumps({"id": r["id"], "video": str(toyworld / r["video"]),
                                                        "caption": r["caption"], "label": r["attrs"]["color"]}) + "\n"
                                            for r in recs))
    out = evaluate.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--data={mine}", f"--out={mine / 'eval.json'}"])
    assert 0.0 <= out["zeroshot_label_acc"] <= 1.0 and out["zeroshot_label_chance"] == 1 / len({r["attrs"]["color"] for r in recs})
    assert "t2a_r1" not in out and "zeroshot_cls_acc" not in out and (mine / "eval.json").exists()
    torch.save({"stage": 1, "model": {}}, tmp_path / "s1.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    from common import CheckpointError, ConfigError
    for bad, says, error in (("s1.pt", "is a stage-1 checkpoint; --ckpt wants a stage-2", ConfigError),
                             ("notes.txt", "is not a readable checkpoint", CheckpointError),
                             ("nowhere.pt", "does not exist", CheckpointError)):
        with pytest.raises(error, match=says):
            evaluate.main([f"--ckpt={tmp_path / bad}", f"--data={toyworld}"])


def test_causal_mode_and_video_only_run(toyworld, toy_pretrained, tmp_path):
    from train_stage2 import main
    m = main(_stage2_args(toyworld, tmp_path, toy_pretrained["bert"], "--max_steps=3", "--mlm_mode=causal",
                          "--audio=none", "--eval=False"))
    assert set(k[len("loss_first_"):] for k in m if k.startswith("loss_first_")) == {"vtc", "vtm", "mlm"}


def test_torchrun_two_processes_stage2(toyworld, toy_pretrained, tmp_path):
    """As for stage 1: a rank aborting at interpreter exit after finishing is tolerated."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_stage2.py"), *_stage2_args(toyworld, tmp_path, toy_pretrained["bert"], "--max_steps=2",
                                                         "--batch_size=4", "--eval=False")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (tmp_path / "metrics.json").exists(), r.stdout[-2000:] + r.stderr[-4000:]
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["step"] == 2 and ck["world"] == 2
    if r.returncode != 0:
        assert "step 2/2" in (tmp_path / "log.txt").read_text(), r.stderr[-4000:]
    # the logged terms are averaged over the ranks like the total, so with unit weights they add up to it
    import re
    lines = [m for line in (tmp_path / "log.txt").read_text().splitlines()
             if (m := re.match(r"step \d+/2 \| loss ([\d.]+) \(([^)]*)\)", line))]
    assert len(lines) == 2
    for m in lines:
        terms = [float(v) for v in m.group(2).split()[1::2]]
        assert len(terms) == 7 and sum(terms) == pytest.approx(float(m.group(1)), abs=2e-4), m.group(0)


def test_stage2_settings_say_what_they_mean():
    """An unknown loss is a named error (it used to train as masked LM); a partial --captions keeps the
    recipe's caption for the other losses; the resolved settings are what the saved config holds."""
    from common import ConfigError, parse_config
    from losses import stage2_objective
    from train_stage2 import Stage2Config
    model = Stage2Model(vision_preset("toy", num_frames=4), text_preset("toy", vocab_size=40), None)
    with pytest.raises(ValueError, match=r"unknown stage-2 loss\(es\) \['vtx'\]"):
        stage2_objective(model, {}, tok=None, weights={"vtc": 1.0, "vtx": 1.0})
    with pytest.raises(ValueError, match="need a model with audio"):
        stage2_objective(model, {}, tok=None, weights={"atc": 1.0})
    cfg = parse_config(Stage2Config(), ["--captions=vtm:avs_caption"])
    assert cfg.caption_map() == {"vtc": "caption", "vtm": "avs_caption", "mlm": "caption", "atc": "audio_caption",
                                 "avtc": "avs_caption", "avtm": "avs_caption", "avmlm": "avs_caption"}
    assert (cfg.lr, cfg.mask_ratio, cfg.w_atc, cfg.contrastive_dim, cfg.max_text_len) == (1e-3, 0.5, 1.0, 96, 24)
    full = parse_config(Stage2Config(), ["--preset=1B", "--audio=none", "--lr=1e-4"])
    assert (full.lr, full.mask_ratio, full.w_atc, full.contrastive_dim, full.max_text_len) == (1e-4, 0.8, 0.0, 512, 32)
    assert set(full.caption_map().values()) == {"caption"} and full.img_size == 224 and full.drop_path == 0.25
    with pytest.raises(ConfigError, match="unknown losses"):
        parse_config(Stage2Config(), ["--captions=vtx:caption"])


def test_official_stage2_layout_loads_by_its_shapes_and_evaluates(toyworld, tmp_path):
    """A tiny file in the released `InternVideo2_Stage2_visual` layout (the key names of
    MM/models/internvideo2_stage2_visual.py:17-48 and xbert.py), wrapped as the official saver wraps it."""
    import evaluate
    from checkpoints import load_official_stage2
    tok = WordPieceTokenizer(toyworld / "vocab.txt")
    torch.manual_seed(0)
    src = Stage2Model(vision_preset("toy", num_frames=4), text_preset("toy", vocab_size=len(tok)), None, 96).eval()
    key_map = bert_key_map(src.text_encoder.cfg)
    state = {f"vision_encoder.{k}": v for k, v in src.vision_encoder.state_dict().items()}
    state.update({f"text_encoder.{key_map[k]}": v for k, v in src.text_encoder.state_dict().items()})
    state.update({k: v for k, v in src.state_dict().items() if not k.startswith(("vision_encoder.", "text_encoder."))})
    extras = {"vision_encoder.clip_pos_embed": torch.zeros(1, 65, 96), "vision_encoder.img_pos_embed": torch.zeros(1, 17, 96),
              "vision_encoder.clip_img_pos_embed": torch.zeros(1, 17, 96),
              "vision_encoder.clip_decoder.0.head.weight": torch.zeros(96, 96),
              "vision_encoder.final_clip_decoder.head.weight": torch.zeros(96, 96),
              "text_encoder.bert.embeddings.position_ids": torch.arange(64)[None],
              "text_encoder.cls.predictions.decoder.weight": src.text_encoder.word_emb.weight}
    torch.save({"model": {**state, **extras}, "epoch": 9}, tmp_path / "official.pth")
    model, report = load_official_stage2(torch.load(tmp_path / "official.pth"), log=lambda m: None)
    assert report["skipped"] == sorted(extras) and set(report["loaded"]) == set(state)
    model.eval()
    video, ids = torch.randn(2, 3, 4, 32, 32), torch.randint(5, len(tok), (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for a, b in zip(model.encode_video(video) + model.encode_text(ids, mask),
                        src.encode_video(video) + src.encode_text(ids, mask)):
            torch.testing.assert_close(a, b)
        mem = src.encode_video(video)[0]
        torch.testing.assert_close(model.match_logits(src.encode_text(ids, mask)[0], mask, mem),
                                   src.match_logits(src.encode_text(ids, mask)[0], mask, mem))
    out = evaluate.main([f"--ckpt={tmp_path / 'official.pth'}", f"--data={toyworld}", f"--vocab={toyworld / 'vocab.txt'}",
                         "--rerank_k=4", f"--out={tmp_path / 'eval.json'}"])
    assert 0.0 <= out["t2v_r1_rerank"] <= 1.0 and out["num_frames"] == 4
    # refused by name: no preset of that shape, a missing tensor, an audio encoder without its tensors, no --vocab
    wide = {**state, "vision_encoder.patch_embed.proj.weight": torch.zeros(80, 3, 1, 8, 8)}
    with pytest.raises(KeyError, match="no vision preset has width 80 and depth 4"):
        load_official_stage2(wide)
    with pytest.raises(KeyError, match="itm_head.weight"):
        load_official_stage2({k: v for k, v in state.items() if k != "itm_head.weight"})
    with pytest.raises(KeyError, match="post_extract_proj"):
        load_official_stage2({**state, "audio_encoder.patch_embedding.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="needs --vocab"):               # a ConfigError
        evaluate.main([f"--ckpt={tmp_path / 'official.pth'}", f"--data={toyworld}"])


def test_official_audio_visual_stage2_layout_loads_by_its_shapes():
    """The 6B audio-visual layout (MM/models/internvideo2_stage2_audiovisual.py): BEATs under audio_encoder. (no cfg)
    and the audio / fusion projections, here at toy sizes."""
    from checkpoints import load_official_stage2
    torch.manual_seed(1)
    src = Stage2Model(vision_preset("toy", num_frames=4), text_preset("toy", vocab_size=60), audio_preset("toy"),
                      96, 96).eval()
    key_map = bert_key_map(src.text_encoder.cfg)
    state = {f"vision_encoder.{k}": v for k, v in src.vision_encoder.state_dict().items()}
    state.update({f"text_encoder.{key_map[k]}": v for k, v in src.text_encoder.state_dict().items()})
    state.update({f"audio_encoder.{k}": v for k, v in _beats_official(src.audio_encoder).items()})
    state.update({k: v for k, v in src.state_dict().items()
                  if not k.startswith(("vision_encoder.", "text_encoder.", "audio_encoder."))})
    assert {"av_fusion.weight", "avtm_head.weight", "av_concat_audio_proj.1.weight", "audio_proj.weight"} <= set(state)
    model, report = load_official_stage2({"module": state}, log=lambda m: None)
    assert report["skipped"] == [] and model.has_audio
    model.eval()
    fbank, video = torch.randn(2, 96, 64), torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.encode_audio(fbank) + model.encode_video(video), src.encode_audio(fbank) + src.encode_video(video)):
            torch.testing.assert_close(a, b)
    with pytest.raises(KeyError, match="av_fusion.weight"):
        load_official_stage2({k: v for k, v in state.items() if k != "av_fusion.weight"})


def test_resume_is_bit_identical_with_masking_and_drop_path(toyworld, toy_pretrained, tmp_path):
    # stage 2 draws torch random numbers every step (the 80% video mask, MLM corruption, hard negatives, drop path):
    # 6 steps == 3 steps + --resume + 3 steps, bit for bit (the loader must not draw from the restored RNG)
    from train_stage2 import main
    args = lambda out, *x: _stage2_args(toyworld, out, toy_pretrained["bert"], "--max_steps=6", "--eval=False",
                                        "--drop_path=0.1", "--batch_size=4", *x)
    main(args(tmp_path / "a"))
    main(args(tmp_path / "b", "--stop_after=3"))
    main(args(tmp_path / "b", "--resume"))
    # and run to run, in a fresh process (its own frame cache, its own thread pool): the same bits
    subprocess.run([sys.executable, str(ROOT / "train_stage2.py"), *args(tmp_path / "c")], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    a, b, c = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in "abc")
    assert a["step"] == b["step"] == c["step"] == 6
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    assert [k for k in a["model"] if not torch.equal(a["model"][k], c["model"][k])] == []
