"""Stage 2 of InternVideo2: align video, audio and speech with text.

Starting from the stage-1 student, a BERT text encoder (19 text + 5 fusion layers for bert-large) and
a frozen BEATs audio encoder are trained together with three kinds of loss on 80%-masked video
(MM/scripts/pretraining/stage2/6B/config.py:98-127): contrastive (VTC: video-text, AVTC: audio+video-text, ATC:
audio-text), matching with hard negatives (VTM, AVTM), and masked language modelling conditioned on the video (MLM,
AVMLM). README.md explains the method; `--mlm_mode=causal` swaps the masked LM for autoregressive captioning.

    python train_stage2.py --init_from=out/stage1/ckpt.pt        # toy on ToyWorld, CPU, about 4 min
    python train_stage2.py --help
    torchrun --standalone --nproc_per_node=8 train_stage2.py --preset=1B --text=bert-large --audio=none \\
        --text_ckpt=bert-large-uncased.bin --vocab=bert-large-uncased-vocab.txt \\
        --init_from=out/stage1_1b/ckpt.pt --data=my_videos --batch_size=64

Writes <out_dir>/ckpt.pt, log.txt and metrics.json (zero-shot retrieval with VTM re-ranking and
zero-shot classification on the held-out split). No gradient accumulation: a contrastive loss needs
every negative in one step, so raise the per-device batch and add ranks instead.
"""
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from checkpoints import check_init_from, TOYS, key_names, load_beats, load_bert, load_video_encoder
from common import (RunLog, WithLoss, barrier, build_optimizer, by_preset, check, cli, compile_blocks, cosine_lr,
                    distribute, finish, load_checkpoint, model_state, optimizer_state, parse_config, preset_img_size,
                    print0, resume, run_summary, save_checkpoint, setup_runtime, training_loop)
from data import (FRAME_CACHE, TOYWORLD, VideoTextDataset, WordPieceTokenizer, prepare_toyworld, sample_file,
                  stage2_fields, train_loader)
from losses import AUDIO_LOSSES, STAGE2_LOSSES, stage2_objective
from model import VISION_PRESETS, Stage2Model, audio_preset, param_table, text_preset, vision_preset
from plots import loss_figure, save_pictures, stage2_similarity_figure
from pretrain_toys import pretrain_toy_bert
from runs import claim_run_dir, finished_run


@dataclass
class Stage2Config:
    # data
    data: str = TOYWORLD            # folder with train.jsonl and val.jsonl (ToyWorld is generated if missing), or the
                                    # official annotation files train.json and val.json (data.load_official_json)
    data_root: str = ""             # where the media paths start (the official data_root); "" = the sample file's folder
    vocab: str = ""                 # BERT vocab.txt; "" = <data>/vocab.txt (ToyWorld writes one)
    max_text_len: int = 0           # tokens per caption with [CLS]/[SEP]; 0 = by preset
    skip_bad_samples: bool = False  # replace unreadable samples by the next one, count and report them
    frame_cache: str = "auto"       # decoded frames kept in memory, shrunk to what training needs: auto (datasets up
                                    # to 5000 clips) | on | off
    frame_cache_mb: int = 2048      # the cache's budget per process (x workers x ranks); later clips are decoded again
    workers: int = 1                # DataLoader worker processes
    hflip: bool = False             # random horizontal flip (the official flips; ToyWorld's directions forbid it)
    crop_scale: float = 0.8         # smallest random-resized-crop area (official 0.5)
    resample_audio: bool = False    # resample audio that is not 16 kHz instead of refusing it
    audio_from_video: bool = False  # a line without `audio`: the video file's sound (MM/dataset/pt_dataset.py:314-318)
    # model
    preset: str = "toy"             # vision: toy | S | B | L | 1B | 6B
    text: str = "toy"               # text encoder: toy | bert-base | bert-large
    audio: str = "toy"              # audio encoder: toy | beats-base | none (the 1B recipe has no audio)
    num_frames: int = 0             # frames per clip; 0 = by preset (MM/scripts/pretraining/stage2/1B/config.py:19-20)
    img_size: int = 0               # 0 = the preset's
    drop_path: float = -1.0         # -1 = the preset's
    contrastive_dim: int = 0        # contrastive width; 0 = by preset
    av_dim: int = 0                 # width of the audio+video memory; 0 = by preset
    init_from: str = ""             # a run's start: a stage-1 checkpoint (its student) or a stage-2 one (everything)
    text_ckpt: str = ""             # BERT state dict (HF names); toy: "" = toys/toy_bert.pt (shipped), trained if missing
    random_text: bool = False       # start the text encoder from random weights (tests)
    audio_ckpt: str = ""            # BEATs checkpoint ({'cfg', 'model'}) for the audio encoder
    train_audio: bool = False       # train the audio encoder (the official 6B recipe freezes it)
    # losses (MM/models/criterions.py:65-342)
    mask_ratio: float = -1.0        # random video masking for every loss in training; -1 = by preset
    mlm_prob: float = 0.5           # masked-LM masking rate (80/10/10 split)
    mlm_mode: str = "mlm"           # mlm (official) | causal (autoregressive captioning, the write-ups' version)
    w_vtc: float = 1.0              # video-text contrastive
    w_vtm: float = 1.0              # video-text matching with hard negatives
    w_mlm: float = 1.0              # masked LM on the video
    w_atc: float = -1.0             # audio-text contrastive; -1 = by preset
    w_avtc: float = 1.0             # audio+video-text contrastive
    w_avtm: float = 1.0             # audio+video-text matching
    w_avmlm: float = 1.0            # masked LM on audio+video
    captions: str = ""              # loss:caption_key pairs, e.g. vtc:caption; the losses not named: by preset
    # optimisation (MM/scripts/pretraining/stage2/1B/config.py:97-107)
    batch_size: int = 32            # clips per process and step (official 64; no accumulation, see the docstring)
    max_steps: int = 600            # optimizer steps (0 = only evaluate --init_from)
    warmup_steps: int = 30          # warmup from 0.01 lr
    lr: float = -1.0                # peak lr; -1 = by preset
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
    overwrite: bool = False         # start anew in an --out_dir that holds another run (its files are replaced)
    ckpt_every: int = 200           # steps between checkpoints (and at the end)
    stop_after: int = 0             # stop after this step without finishing the schedule (0 = off)
    log_every: int = 10             # steps between log.txt lines
    max_nan_in_a_row: int = 5       # non-finite losses in a row that stop the run
    eval: bool = True               # zero-shot retrieval + classification at the end
    rerank_k: int = 128             # candidates for VTM re-ranking (MM/scripts/pretraining/stage2/1B/config.py:114)
    eval_batch: int = 64            # clips per evaluation batch

    grad_accum = 1                  # fixed: see the docstring

    # Defaults that depend on the recipe, (toy, 1B: video only, 6B: audio-visual). The 1B and 6B columns
    # are the official configs (MM/scripts/pretraining/stage2/*/config.py); toy: 16 patches a frame hide the object at
    # 80% masking, ToyWorld evaluates text -> video, -> audio and -> audio+video, and its speeds need 8 frames: 4 of 16
    # sampled one per segment leave the frame spacing to chance, and speed fades (README, differences).
    BY_PRESET = {
        "num_frames": (8, 4, 4), "lr": (1e-3, 5e-5, 5e-5), "mask_ratio": (0.5, 0.8, 0.8), "w_atc": (1.0, 0.0, 0.0),
        "contrastive_dim": (96, 512, 768), "av_dim": (96, 768, 768), "max_text_len": (24, 32, 40),
        "captions": ("vtc:caption,vtm:caption,mlm:caption,atc:audio_caption,avtc:avs_caption,avtm:avs_caption,"
                     "avmlm:avs_caption", ",".join(f"{n}:caption" for n in STAGE2_LOSSES),
                     ",".join(f"{n}:avs_caption" for n in STAGE2_LOSSES))}

    def validate(self):
        check(self.mlm_mode in ("mlm", "causal"), f"--mlm_mode must be mlm or causal, got {self.mlm_mode!r}")
        check(0.0 < self.mlm_prob < 1.0, f"--mlm_prob must be in (0, 1), got {self.mlm_prob}")
        check(self.batch_size > 0 and self.max_steps >= 0, "--batch_size must be > 0 and --max_steps >= 0")
        check(self.audio in ("toy", "beats-base", "none"), f"--audio must be toy, beats-base or none, got {self.audio!r}")
        check(self.preset in VISION_PRESETS, f"--preset must be one of {list(VISION_PRESETS)}, got {self.preset!r}")
        pairs = [p.split(":") for p in self.captions.split(",")] if self.captions else []
        check(all(len(p) == 2 for p in pairs), f"--captions wants loss:caption_key pairs, got {self.captions!r}")
        check(set(dict(pairs)) <= set(STAGE2_LOSSES), f"--captions names unknown losses "
              f"{sorted(set(dict(pairs)) - set(STAGE2_LOSSES))}; the losses are {list(STAGE2_LOSSES)}")
        self.captions = ""                      # the recipe's mapping, then the pairs given on top of it
        by_preset(self, self.BY_PRESET, 0 if self.preset == "toy" else (2 if self.audio != "none" else 1))
        base = VISION_PRESETS[self.preset]                  # img_size and drop_path: the preset's
        self.img_size = preset_img_size(self.preset, base, self.img_size)
        self.drop_path = base.drop_path if self.drop_path < 0 else self.drop_path
        self.captions = ",".join(f"{k}:{v}" for k, v in {**self.caption_map(), **dict(pairs)}.items())
        check(0.0 <= self.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {self.mask_ratio}")
        check(self.lr > 0, f"--lr must be positive, got {self.lr}")

    def caption_map(self):
        """{loss: caption key} from --captions."""
        return dict(p.split(":") for p in self.captions.split(","))

    def weights(self):
        """Enabled losses -> weight; audio losses only when there is an audio encoder."""
        w = {name: getattr(self, f"w_{name}") for name in STAGE2_LOSSES}
        return {k: v for k, v in w.items() if v and (self.audio != "none" or k not in AUDIO_LOSSES)}


def main(argv=None):
    cfg = parse_config(Stage2Config(), sys.argv[1:] if argv is None else argv, __doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    claim_run_dir(cfg.out_dir, rt, cfg.resume, cfg.overwrite)
    out_dir = Path(cfg.out_dir)

    # ---- data ---------------------------------------------------------------------------------
    prepare_toyworld(cfg.data, rt)
    tok = WordPieceTokenizer(cfg.vocab or Path(cfg.data) / "vocab.txt")
    vcfg = vision_preset(cfg.preset, num_frames=cfg.num_frames, img_size=cfg.img_size, drop_path=cfg.drop_path)
    tcfg = text_preset(cfg.text, **({"vocab_size": len(tok)} if cfg.text == "toy" else {}))
    check(len(tok) <= tcfg.vocab_size, f"the vocabulary has {len(tok)} tokens, the text encoder {tcfg.vocab_size}")
    acfg = None if cfg.audio == "none" else audio_preset(cfg.audio)
    weights = cfg.weights()
    keys = sorted({cfg.caption_map()[name] for name in weights})
    audio_frames = acfg.frames if acfg and any(n in AUDIO_LOSSES for n in weights) else 0
    T, Np = vcfg.grid[0], vcfg.grid[1] * vcfg.grid[2]
    train_set = VideoTextDataset(sample_file(cfg.data, "train"), cfg.num_frames, vcfg.img_size, train=True,
                                 seed=cfg.seed, skip_bad=cfg.skip_bad_samples, data_root=cfg.data_root or None,
                                 cache=FRAME_CACHE[cfg.frame_cache], cache_mb=cfg.frame_cache_mb, noise_grid=(T, Np),
                                 crop_scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip,
                                 extra=stage2_fields(tok, keys, cfg.max_text_len, audio_frames, True,
                                                     cfg.resample_audio, cfg.audio_from_video))

    # ---- model, optimizer, resume ------------------------------------------------------------
    model = Stage2Model(vcfg, tcfg, acfg, cfg.contrastive_dim, cfg.av_dim)
    if cfg.text == "toy" and not cfg.random_text:           # the toy stand-in for bert-*-uncased
        cfg.text_ckpt = cfg.text_ckpt or str(TOYS / "toy_bert.pt")
        if rt.master and not Path(cfg.text_ckpt).exists():
            pretrain_toy_bert(cfg.data, tok, model.text_encoder.cfg, cfg.text_ckpt, max_len=cfg.max_text_len,
                              seed=cfg.seed)
        barrier(rt)
    if cfg.text_ckpt:
        bert_state, used = load_checkpoint(cfg.text_ckpt), set()
        fresh = load_bert(model.text_encoder, bert_state, used=used)
        ignored = [k for k in bert_state if k not in used]
        print0(f"text encoder from {cfg.text_ckpt}; new (random) tensors: {len(fresh)} "
               f"({sorted({k.split('.')[2] for k in fresh if k.startswith('layers.')})} of the fusion layers); "
               f"ignored {len(ignored)} keys: {key_names(ignored)}", rt=rt)
    if acfg and cfg.audio_ckpt:
        model.audio_encoder = load_beats(load_checkpoint(cfg.audio_ckpt))
    if acfg and not cfg.train_audio:
        model.audio_encoder.requires_grad_(False)               # frozen, but in train mode like the official
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from)
        check_init_from(ck, cfg.init_from, ("stage-1 checkpoint", "stage-2 checkpoint", "released stage-1 module",
                                            "released stage-2 file"), stage=2)
        if ck.get("stage") == 2:                                   # a stage-2 checkpoint: everything
            model.load_state_dict(ck["model"])
            print0(f"loaded the whole stage-2 model from {cfg.init_from}", rt=rt)
        else:                                                      # the hand-off: its video encoder
            load_video_encoder(model, ck, cfg.init_from, log=lambda msg: print0(msg, rt=rt))
    model.to(rt.device)
    model.vision_encoder.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), 1e-8, model.no_weight_decay(),
                                rt.device.type)
    scaler = rt.make_scaler()
    step, ck = resume(out_dir, model, optimizer, scaler, rt, cfg, stage=2) if cfg.resume else (0, None)
    if cfg.resume and (done := finished_run(out_dir, step, cfg.max_steps, rt)) is not None:
        return done
    log = RunLog(out_dir, cfg, rt, resume=step > 0)
    global_batch = cfg.batch_size * rt.world
    print0(f"stage 2: vision {cfg.preset}, text {cfg.text}, audio {cfg.audio}"
           f"{' (frozen)' if acfg and not cfg.train_audio else ''}\n{param_table(model)}\n"
           f"losses {weights} | captions {cfg.caption_map()} | {rt.device} {rt.dtype} world {rt.world} "
           f"| global batch {global_batch} | lr {cfg.lr:.2e}", rt=rt)

    if cfg.compile:
        compile_blocks(model)
    settings = dict(tok=tok, weights=weights, captions=cfg.caption_map(), mask_ratio=cfg.mask_ratio,
                    mlm_prob=cfg.mlm_prob, mlm_mode=cfg.mlm_mode)
    wrapped = WithLoss(model, lambda model, batch: stage2_objective(model, batch, **settings))
    wrapped = distribute(wrapped, rt, find_unused=True)

    # ---- train ---------------------------------------------------------------------------------
    def save(step, nan_skips):
        save_checkpoint(out_dir / "ckpt.pt", {
            "stage": 2, "step": step, "model": model_state(model), "optimizer": optimizer_state(model, optimizer),
            "scaler": scaler.state_dict() if scaler else None, "config": asdict(cfg),
            "model_config": model.model_config(), "nan_skips": nan_skips}, rt)

    result = {"history": [], "n_bad": 0, "step": step, "nan_skips": 0}
    if step < cfg.max_steps:
        loader = iter(train_loader(train_set, cfg.batch_size, rt.rank, rt.world, cfg.seed, start=step,
                                   workers=cfg.workers))
        model.train()
        floor = cfg.min_lr_ratio * cfg.lr
        result = training_loop(
            wrapped, optimizer, loader, rt, cfg, step=step, scaler=scaler, log=log, save=save, desc="stage 2",
            lr_at=lambda s: cosine_lr(s, cfg.max_steps, cfg.warmup_steps, cfg.lr, floor, start_lr=floor),
            clips_per_step=global_batch, bad_lines=train_set.n_bad_lines,
            nan_skips=ck.get("nan_skips", 0) if ck else 0)

    held_out = lambda: VideoTextDataset(sample_file(cfg.data, "val"), cfg.num_frames, vcfg.img_size, train=False,
                                        data_root=cfg.data_root or None,
                                        extra=stage2_fields(tok, ["caption"], cfg.max_text_len, train=False))
    save_pictures(out_dir, lambda: {"loss.png": loss_figure({"stage 2": result}),
                                    "similarity.png": stage2_similarity_figure(model, held_out())}, rt)

    # ---- evaluate ------------------------------------------------------------------------------
    metrics = {"stage": 2, "preset": cfg.preset, **run_summary(result, cfg.max_steps)}
    if cfg.eval and result["step"] == cfg.max_steps:
        from evaluate import evaluate_stage2
        metrics.update(evaluate_stage2(model, tok, cfg, vcfg, acfg, rt))
    return finish(out_dir, metrics, rt, lambda k: k.endswith(("_r1", "_r1_rerank", "cls_acc")), log)


if __name__ == "__main__":
    cli(main)
