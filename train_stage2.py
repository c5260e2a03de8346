"""Stage 2 of InternVideo2: align video, audio and speech with text.

Starting from the stage-1 student, a BERT text encoder (19 text + 5 fusion layers for bert-large) and
a frozen BEATs audio encoder are trained together with three kinds of loss on 80%-masked video
(FACTS 2): contrastive (VTC: video-text, AVTC: audio+video-text, ATC: audio-text), matching with hard
negatives (VTM, AVTM), and masked language modelling conditioned on the video (MLM, AVMLM).
README.md explains the method; `--mlm_mode=causal` swaps the masked LM for autoregressive captioning.

    python train_stage2.py --init_from=out/stage1/ckpt.pt        # toy on ToyWorld, CPU, about 4 min
    python train_stage2.py --help
    torchrun --standalone --nproc_per_node=8 train_stage2.py --preset=1B --text=bert-large --audio=none \\
        --text_ckpt=bert-large-uncased.bin --vocab=bert-large-uncased-vocab.txt \\
        --init_from=out/stage1_1b/ckpt.pt --data=my_videos --batch_size=64

Writes <out_dir>/ckpt.pt, log.txt and metrics.json (zero-shot retrieval with VTM re-ranking and
zero-shot classification on the held-out split). No gradient accumulation: a contrastive loss needs
every negative in one step, so raise the per-device batch and add ranks instead (STYLE decisions).
"""
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (RunLog, WithLoss, barrier, build_optimizer, check, cleanup, compile_blocks, cosine_lr, distribute,
                    load_checkpoint, model_state, optimizer_state, parse_config, print0, resume, run_summary,
                    save_checkpoint, setup_runtime, training_loop, write_json)
from data import (TOYWORLD, VideoTextDataset, WordPieceTokenizer, prepare_toyworld, random_mask, stage2_fields,
                  train_loader)
from losses import captioning_loss, contrastive_loss, matching_loss, mlm_loss
from model import (Stage2Model, audio_preset, interpolate_pos_embed_time, load_beats, load_bert, param_table,
                   text_preset, vision_preset)
from pretrain_toys import pretrain_toy_bert

LOSSES = ("vtc", "vtm", "mlm", "atc", "avtc", "avtm", "avmlm")
AUDIO_LOSSES = ("atc", "avtc", "avtm", "avmlm")


@dataclass
class Stage2Config:
    # data
    data: str = TOYWORLD            # folder with train.jsonl and val.jsonl (ToyWorld is generated if missing)
    vocab: str = ""                 # BERT vocab.txt; "" = <data>/vocab.txt (ToyWorld writes one)
    max_text_len: int = 0           # tokens per caption with [CLS]/[SEP]; 0 = 32 (1B) / 40 (with audio), toy 24
    skip_bad_samples: bool = False  # replace unreadable samples by the next one, count and report them
    workers: int = 1                # DataLoader worker processes
    hflip: bool = False             # random horizontal flip (the official flips; ToyWorld's directions forbid it)
    crop_scale: float = 0.8         # smallest random-resized-crop area (official 0.5)
    resample_audio: bool = False    # resample audio that is not 16 kHz instead of refusing it
    # model
    preset: str = "toy"             # vision: toy | S | B | L | 1B | 6B
    text: str = "toy"               # text encoder: toy | bert-base | bert-large
    audio: str = "toy"              # audio encoder: toy | beats-base | none (the 1B recipe has no audio)
    num_frames: int = 4             # frames per clip (FACTS 2.1)
    img_size: int = 0               # 0 = the preset's
    drop_path: float = -1.0         # -1 = the preset's
    embed_dim: int = 0              # contrastive width; 0 = 512 (video only) or 768 (with audio), toy 96
    av_dim: int = 0                 # width of the audio+video memory; 0 = 768, toy 96
    init_from: str = ""             # stage-1 checkpoint (its student), or a stage-2 checkpoint (everything)
    text_ckpt: str = ""             # BERT state dict (HF names); toy: "" = out/text/toy_bert.pt, trained if missing
    random_text: bool = False       # start the text encoder from random weights (tests)
    audio_ckpt: str = ""            # BEATs checkpoint ({'cfg', 'model'}) for the audio encoder
    train_audio: bool = False       # train the audio encoder (the official 6B recipe freezes it)
    # losses (FACTS 2.6)
    mask_ratio: float = -1.0        # random video masking for every loss in training; -1 = 0.8 (official), toy 0.5
    mlm_prob: float = 0.5           # masked-LM masking rate (80/10/10 split)
    mlm_mode: str = "mlm"           # mlm (official) | causal (autoregressive captioning, the write-ups' version)
    w_vtc: float = 1.0              # video-text contrastive
    w_vtm: float = 1.0              # video-text matching with hard negatives
    w_mlm: float = 1.0              # masked LM on the video
    w_atc: float = -1.0             # audio-text contrastive; -1 = 0 (official) for full presets, 1 for toy
    w_avtc: float = 1.0             # audio+video-text contrastive
    w_avtm: float = 1.0             # audio+video-text matching
    w_avmlm: float = 1.0            # masked LM on audio+video
    captions: str = ""              # loss:caption_key pairs; "" = official (all avs_caption with audio, else caption), toy mixes
    # optimisation (FACTS 2.8)
    batch_size: int = 32            # clips per process and step (official 64; no accumulation, see the docstring)
    max_steps: int = 300            # optimizer steps (0 = only evaluate --init_from)
    warmup_steps: int = 30          # warmup from 0.01 lr
    lr: float = -1.0                # peak lr; -1 = 5e-5 (FACTS 2.8), toy 1e-3
    min_lr_ratio: float = 0.01      # cosine floor and warmup start, as a fraction of lr
    weight_decay: float = 0.05      # not on 1-D params, biases, temp, pos/cls
    beta2: float = 0.98             # AdamW betas (0.9, beta2), eps 1e-8
    grad_clip: float = 3.0          # max global grad norm
    # system
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"             # auto (CUDA bf16, else fp32) | float32 | bfloat16 | float16
    compile: bool = False           # torch.compile every block of every tower (regional)
    grad_ckpt_blocks: int = 0       # activation checkpointing for the first N vision blocks
    seed: int = 0                   # seeds init, data order, augmentation and masks
    out_dir: str = "out/stage2"     # ckpt.pt, log.txt, metrics.json
    resume: bool = False            # continue <out_dir>/ckpt.pt exactly
    ckpt_every: int = 200           # steps between checkpoints (and at the end)
    stop_after: int = 0             # stop after this step without finishing the schedule (0 = off)
    log_every: int = 10             # steps between log.txt lines
    max_nan_in_a_row: int = 5       # non-finite losses in a row that stop the run
    eval: bool = True               # zero-shot retrieval + classification at the end
    rerank_k: int = 128             # candidates re-ranked by the matching head (FACTS 5.1)
    eval_batch: int = 64            # clips per evaluation batch

    grad_accum = 1                  # fixed: see the docstring

    def validate(self):
        toy = self.preset == "toy"
        check(self.mlm_mode in ("mlm", "causal"), f"--mlm_mode must be mlm or causal, got {self.mlm_mode!r}")
        check(self.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {self.mask_ratio}")
        check(0.0 < self.mlm_prob < 1.0, f"--mlm_prob must be in (0, 1), got {self.mlm_prob}")
        check(self.batch_size > 0 and self.max_steps >= 0, "--batch_size must be > 0 and --max_steps >= 0")
        check(self.audio in ("toy", "beats-base", "none"), f"--audio must be toy, beats-base or none, got {self.audio!r}")
        check(not (self.resume and self.init_from and self.max_steps), "use --resume or --init_from, not both")
        if self.lr < 0:
            self.lr = 1e-3 if toy else 5e-5
        if self.mask_ratio < 0:     # the toy grid has 16 patches a frame: at 80% the object is often all hidden
            self.mask_ratio = 0.5 if toy else 0.8
        if self.w_atc < 0:
            self.w_atc = 1.0 if toy else 0.0
        if not self.embed_dim:
            self.embed_dim = 96 if toy else (768 if self.audio != "none" else 512)
        if not self.av_dim:
            self.av_dim = 96 if toy else 768
        if not self.max_text_len:
            self.max_text_len = 24 if toy else (40 if self.audio != "none" else 32)
        if not self.captions:
            if toy:      # ToyWorld evaluates text->video, text->audio and text->audio+video retrieval
                self.captions = ("vtc:caption,vtm:caption,mlm:caption,atc:audio_caption,"
                                 "avtc:avs_caption,avtm:avs_caption,avmlm:avs_caption")
            else:        # official: 6B uses avs_captions for every loss, 1B its only caption
                key = "avs_caption" if self.audio != "none" else "caption"
                self.captions = ",".join(f"{l}:{key}" for l in LOSSES)
        pairs = dict(p.split(":") for p in self.captions.split(","))
        check(set(pairs) <= set(LOSSES), f"--captions names unknown losses {sorted(set(pairs) - set(LOSSES))}")
        self.caption_of = pairs

    def weights(self):
        """Enabled losses -> weight; audio losses only when there is an audio encoder."""
        w = {name: getattr(self, f"w_{name}") for name in LOSSES}
        return {k: v for k, v in w.items() if v and (self.audio != "none" or k not in AUDIO_LOSSES)}


def stage2_loss_fn(cfg, rt, tok):
    """(model, batch) -> (loss, parts). Every loss reads the 80%-masked video (FACTS 6.12); the text
    tower runs once per caption type in use; the temperature is clamped first (FACTS 2.6)."""
    weights = cfg.weights()

    def loss_fn(model, batch):
        dev = rt.device
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        temp = model.temp
        video = batch["video"].to(dev, non_blocking=True)
        visible = random_mask(batch["mask_noise"].to(dev), cfg.mask_ratio)
        v_mem, v_emb = model.encode_video(video, visible)
        texts = {}
        for key in {cfg.caption_of[name] for name in weights}:
            t_ids, t_mask = batch[f"ids_{key}"].to(dev), batch[f"mask_{key}"].to(dev)
            texts[key] = (t_ids, t_mask, *model.encode_text(t_ids, t_mask))    # ids, mask, states, emb
        a_mem = a_emb = None
        if any(name in AUDIO_LOSSES for name in weights):
            a_mem, a_emb = model.encode_audio(batch["fbank"].to(dev))
        parts = {}
        for name, w in weights.items():
            t_ids, t_mask, t_states, t_emb = texts[cfg.caption_of[name]]
            ids = batch[f"pos_{cfg.caption_of[name]}"].to(dev)          # multi-positive sample ids
            if name in ("vtc", "atc", "avtc"):
                x = {"vtc": v_emb, "atc": a_emb, "avtc": model.fuse_av(a_emb, v_emb) if a_emb is not None else None}[name]
                parts[name] = contrastive_loss(F.normalize(x, dim=-1), F.normalize(t_emb, dim=-1), temp, ids)
            elif name in ("vtm", "avtm"):
                mem, x, head = (v_mem, v_emb, "itm") if name == "vtm" else \
                    (torch.cat([a_mem, v_mem], 1), model.fuse_av(a_emb, v_emb), "avtm")
                match = lambda s, m, mm, head=head: model.match_logits(s, m, mm, head)
                parts[name] = matching_loss(match, t_states, t_mask, mem, x, t_emb, temp, ids)
            else:                                              # mlm / avmlm
                mem = v_mem if name == "mlm" else torch.cat([a_mem, v_mem], 1)
                parts[name] = (mlm_loss(model.text_encoder, t_ids, t_mask, mem, tok, cfg.mlm_prob)
                               if cfg.mlm_mode == "mlm" else captioning_loss(model.text_encoder, t_ids, t_mask, mem))
        return sum(weights[k] * v for k, v in parts.items()), parts
    return loss_fn


def load_stage1_into(model, path, num_frames, rt):
    """The stage-1 -> stage-2 hand-off (FACTS 4.4): the student's encoder weights, position table
    interpolated in time (8 -> 4 frames), distillation heads and their tables dropped. Every skipped
    checkpoint key and every model key left at its fresh init is reported."""
    ck = load_checkpoint(path)
    if ck.get("stage") == 2:                                   # a stage-2 checkpoint: everything
        model.load_state_dict(ck["model"])
        print0(f"loaded the whole stage-2 model from {path}", rt=rt)
        return
    state, t_old = dict(ck["model"]), ck.get("model_config", {}).get("num_frames", num_frames)
    tubelet = ck.get("model_config", {}).get("tubelet_size", 1)
    enc = model.vision_encoder
    state["pos_embed"] = interpolate_pos_embed_time(state["pos_embed"], t_old // tubelet, num_frames // tubelet)
    skipped = sorted(k for k in state if k not in enc.state_dict())
    for k in skipped:
        state.pop(k)
    missing = sorted(set(enc.state_dict()) - set(state))
    if missing:
        raise KeyError(f"{path} lacks vision-encoder weights {missing[:10]}")
    enc.load_state_dict(state)
    heads = sorted({k.split(".")[0] for k in skipped})
    others = sorted({k.split(".")[0] for k in model.state_dict() if not k.startswith("vision_encoder.")})
    print0(f"stage-1 hand-off from {path}: loaded all {len(enc.state_dict())} vision-encoder tensors "
           f"(pos_embed {t_old} -> {num_frames} frames); skipped {len(skipped)} keys of {heads}; "
           f"not in a stage-1 checkpoint: {others}", rt=rt)


def main(argv=None):
    cfg = parse_config(Stage2Config(), sys.argv[1:] if argv is None else argv, __doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    out_dir = Path(cfg.out_dir)

    # ---- data ---------------------------------------------------------------------------------
    prepare_toyworld(cfg.data, rt)
    tok = WordPieceTokenizer(cfg.vocab or Path(cfg.data) / "vocab.txt")
    overrides = {"num_frames": cfg.num_frames}
    if cfg.img_size:
        overrides["img_size"] = cfg.img_size
    if cfg.drop_path >= 0:
        overrides["drop_path"] = cfg.drop_path
    vcfg = vision_preset(cfg.preset, **overrides)
    tcfg = text_preset(cfg.text, **({"vocab_size": len(tok)} if cfg.text == "toy" else {}))
    check(len(tok) <= tcfg.vocab_size, f"the vocabulary has {len(tok)} tokens, the text encoder {tcfg.vocab_size}")
    acfg = None if cfg.audio == "none" else audio_preset(cfg.audio)
    weights = cfg.weights()
    keys = sorted({cfg.caption_of[name] for name in weights})
    audio_frames = acfg.frames if acfg and any(n in AUDIO_LOSSES for n in weights) else 0
    T, Np = vcfg.grid[0], vcfg.grid[1] * vcfg.grid[2]
    train_set = VideoTextDataset(Path(cfg.data) / "train.jsonl", cfg.num_frames, vcfg.img_size, train=True,
                                 seed=cfg.seed, skip_bad=cfg.skip_bad_samples, noise_grid=(T, Np),
                                 crop_scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip,
                                 extra=stage2_fields(tok, keys, cfg.max_text_len, audio_frames, True, cfg.resample_audio))

    # ---- model, optimizer, resume ------------------------------------------------------------
    model = Stage2Model(vcfg, tcfg, acfg, cfg.embed_dim, cfg.av_dim)
    if cfg.text == "toy" and not cfg.random_text:           # the toy stand-in for bert-*-uncased
        cfg.text_ckpt = cfg.text_ckpt or "out/text/toy_bert.pt"
        if rt.master and not Path(cfg.text_ckpt).exists():
            pretrain_toy_bert(cfg.data, tok, model.text_encoder.cfg, cfg.text_ckpt, max_len=cfg.max_text_len,
                              seed=cfg.seed)
        barrier(rt)
    if cfg.text_ckpt:
        fresh = load_bert(model.text_encoder, load_checkpoint(cfg.text_ckpt))
        print0(f"text encoder from {cfg.text_ckpt}; new (random) tensors: {len(fresh)} "
               f"({sorted({k.split('.')[2] for k in fresh if k.startswith('layers.')})} of the fusion layers)", rt=rt)
    if acfg and cfg.audio_ckpt:
        model.audio_encoder = load_beats(load_checkpoint(cfg.audio_ckpt))
    if acfg and not cfg.train_audio:
        model.audio_encoder.requires_grad_(False)               # frozen, but in train mode like the official
    if cfg.init_from:
        load_stage1_into(model, cfg.init_from, cfg.num_frames, rt)
    model.to(rt.device)
    model.vision_encoder.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), 1e-8, model.no_weight_decay(),
                                rt.device.type)
    scaler = rt.make_scaler()
    step, ck = resume(out_dir, model, optimizer, scaler, rt) if cfg.resume else (0, None)
    log = RunLog(out_dir, cfg, rt, resume=step > 0)
    global_batch = cfg.batch_size * rt.world
    print0(f"stage 2: vision {cfg.preset}, text {cfg.text}, audio {cfg.audio}"
           f"{' (frozen)' if acfg and not cfg.train_audio else ''}\n{param_table(model)}\n"
           f"losses {weights} | captions {cfg.caption_of} | {rt.device} {rt.dtype} world {rt.world} "
           f"| global batch {global_batch} | lr {cfg.lr:.2e}", rt=rt)

    if cfg.compile:
        compile_blocks(model)
    wrapped = WithLoss(model, stage2_loss_fn(cfg, rt, tok))
    wrapped = distribute(wrapped, rt, find_unused=True)

    # ---- train ---------------------------------------------------------------------------------
    def save(step, nan_skips):
        save_checkpoint(out_dir / "ckpt.pt", {
            "stage": 2, "step": step, "model": model_state(model), "optimizer": optimizer_state(model, optimizer),
            "scaler": scaler.state_dict() if scaler else None, "config": asdict(cfg),
            "model_config": {"vision": asdict(vcfg), "text": asdict(model.text_encoder.cfg),
                             "audio": asdict(acfg) if acfg else None, "embed_dim": cfg.embed_dim,
                             "av_dim": cfg.av_dim}, "nan_skips": nan_skips}, rt)

    result = {"history": [], "n_bad": 0, "step": step, "nan_skips": 0}
    if step < cfg.max_steps:
        loader = iter(train_loader(train_set, cfg.batch_size, rt.rank, rt.world, cfg.seed, start=step,
                                   workers=cfg.workers))
        model.train()
        floor = cfg.min_lr_ratio * cfg.lr
        result = training_loop(
            wrapped, optimizer, loader, rt, cfg, step=step, scaler=scaler, log=log, save=save, desc="stage 2",
            lr_at=lambda s: cosine_lr(s, cfg.max_steps, cfg.warmup_steps, cfg.lr, floor, start_lr=floor),
            clips_per_step=global_batch, nan_skips=ck.get("nan_skips", 0) if ck else 0)

    # ---- evaluate ------------------------------------------------------------------------------
    metrics = {"stage": 2, "preset": cfg.preset, **run_summary(result, cfg.max_steps)}
    if cfg.eval and result["step"] == cfg.max_steps:
        from evaluate import evaluate_stage2
        metrics.update(evaluate_stage2(model, tok, cfg, vcfg, acfg, rt))
    if rt.master:
        write_json(out_dir / "metrics.json", metrics)
        log(f"metrics {metrics}")
        print0(f"metrics -> {out_dir / 'metrics.json'}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("_r1", "_r1_rerank", "cls_acc"))))
    cleanup(rt)
    return metrics


if __name__ == "__main__":
    main()
