"""Stage 1 of InternVideo2: unmasked-token distillation of a video ViT from two frozen teachers.

The student sees 20% of the patches of an 8-frame clip (attention-guided masking from the image
teacher) and regresses, at those positions only, the tokens of an image teacher (InternViT-6B:
last 6 blocks + its pooled vector) and of a video teacher (VideoMAEv2-g, 16 frames: last 4 blocks),
with 2 - 2cos losses on L2-normalised features (SM/scripts/pretraining/1B_pt.sh:19-67). README.md explains the method.

    python train_stage1.py                                   # toy on ToyWorld, CPU, about 8 min
    python train_stage1.py --help                            # every option
    torchrun --standalone --nproc_per_node=8 train_stage1.py --preset=1B --data=my_videos/ \\
        --clip_teacher=internvit-6b --clip_teacher_ckpt=internvl_c_13b_224px.pth \\
        --mae_teacher=videomae-g --mae_teacher_ckpt=vit_g_hybrid_1200e_pre.pth --img_size=224

Writes <out_dir>/ckpt.pt (student + heads, optimizer, step, RNG), log.txt and metrics.json (linear probes of the
pooled vector and the mean token, attentive probes of the tokens; evaluate.evaluate_stage1). `--resume` continues
exactly; stage 2 takes `--init_from=<ckpt.pt>`.
"""
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from checkpoints import TOYS, check_init_from, stage1_student_state
from common import (RunLog, WithLoss, barrier, build_optimizer, by_preset, check, cli, compile_blocks, cosine_lr,
                    distribute, finish, load_checkpoint, load_state, model_state, optimizer_state, parse_config,
                    pick_dtype, preset_img_size, print0, resume, run_summary, save_checkpoint, setup_runtime,
                    training_loop)
from data import FRAME_CACHE, TOYWORLD, VideoTextDataset, prepare_toyworld, sample_file, train_loader
from evaluate import evaluate_stage1
from fp8 import float8_teachers
from fsdp import shard
from losses import stage1_objective
from model import MASK_TYPES, VISION_PRESETS, InternVideo2, count_params, param_table, vision_preset
from plots import loss_figure, save_pictures, stage1_mask_figure
from pretrain_toys import pretrain_toy_teachers
from runs import claim_run_dir, finished_run
from teachers import build_teachers


@dataclass
class Stage1Config:
    # data
    data: str = TOYWORLD            # folder with train.jsonl and val.jsonl (ToyWorld is generated if missing), or the
                                    # official annotation files train.json and val.json (data.load_official_json)
    data_root: str = ""             # where the media paths start (the official data_root); "" = the sample file's folder
    skip_bad_samples: bool = False  # replace unreadable samples by the next one, count and report them
    frame_cache: str = "auto"       # decoded frames kept in memory, shrunk to what training needs: auto (datasets up
                                    # to 5000 clips) | on | off
    frame_cache_mb: int = 2048      # the cache's budget per process (x workers x ranks); later clips are decoded again
    workers: int = 1                # DataLoader worker processes
    hflip: bool = False             # random horizontal flip (the official flips; ToyWorld's directions forbid it)
    crop_scale: float = 0.6         # smallest crop area fraction of the random resized crop (1.0 = no crop)
    # student
    preset: str = "toy"             # toy | S | B | L | 1B | 6B (model.py)
    num_frames: int = 8             # student frames; the video teacher sees twice as many (SM/run_pretraining.py:238)
    img_size: int = 0               # 0 = the preset's (toy 32, others 224)
    drop_path: float = -1.0         # -1 = the preset's (1B 0.25, 6B 0.3; SM/scripts/pretraining/*_pt.sh:46)
    # teachers
    clip_teacher: str = "toy"       # toy | internvit-6b
    mae_teacher: str = "toy"        # toy | videomae-g
    clip_teacher_ckpt: str = ""     # "" = toys/toy_clip_teacher.pt for toy (shipped; trained if missing)
    mae_teacher_ckpt: str = ""      # "" = toys/toy_mae_teacher.pt for toy (shipped; trained if missing)
    random_teachers: bool = False   # random-init teachers (benchmarks, tests); the probes are then meaningless
    mae_teacher_attention: str = "standard"  # standard | official: the released code's attention (README, differences)
    teacher_steps: tuple = (2000, 400)  # toy teachers' steps when they must be trained: (CLIP, motion classes)
    # masking and loss
    mask_type: str = "attention"    # attention | tube | random (SM/scripts/pretraining/1B_pt.sh:23-24)
    mask_ratio: float = -1.0        # fraction of each frame's patches hidden from the student; -1 = by preset
    w_clip: float = 1.0             # weight of the image-teacher layer term
    w_clip_final: float = 1.0       # weight of the image-teacher pooled term
    w_mae: float = 1.0              # weight of the video-teacher layer term
    # optimisation (SM/scripts/pretraining/1B_pt.sh:45-62; SM/run_pretraining.py:351-353)
    batch_size: int = 32            # clips per micro-batch per process
    grad_accum: int = 1             # micro-batches per optimizer step
    max_steps: int = 1200           # optimizer steps (0 = only evaluate the initial weights)
    warmup_steps: int = 40          # linear warmup from 0
    lr: float = -1.0                # peak lr per 256 clips, scaled by global batch / 256; -1 = by preset
    min_lr: float = -1.0            # final cosine lr per 256 clips; -1 = by preset
    weight_decay: float = 0.05      # AdamW, not on 1-D params, biases, pos/cls
    beta2: float = 0.98             # AdamW betas (0.9, beta2), eps 1e-6
    grad_clip: float = 3.0          # max global grad norm
    # system
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"             # auto (CUDA bf16, else fp32) | float32 | bfloat16 | float16
    compile: bool = False           # torch.compile the student's and the teachers' blocks (regional)
    teacher_dtype: str = "auto"     # auto (bf16 in bf16 autocast, else fp32) | float32 | bfloat16 | float8(_tensor)
    #   float8(_tensor): the teachers' nn.Linears in e4m3 (fp8.py), activation scales per token (per tensor), the
    #   rest in auto's dtype; FP8 matmuls on CUDA >= 8.9, elsewhere the same numbers in fp32 (slower)
    grad_ckpt_blocks: int = 0       # activation checkpointing for the first N student blocks
    fsdp: bool = False              # under torchrun: FSDP2-shard the student (6B) instead of DDP
    seed: int = 0                   # seeds init, data order, augmentation and masks
    out_dir: str = "out/stage1"     # ckpt.pt, log.txt, metrics.json
    init_from: str = ""             # a run's start: this checkpoint's student weights (not its optimizer)
    resume: bool = False            # continue <out_dir>/ckpt.pt exactly (model, optimizer, step, RNG, data)
    overwrite: bool = False         # start anew in an --out_dir that holds another run (its files are replaced)
    ckpt_every: int = 100           # steps between checkpoints (and at the end)
    stop_after: int = 0             # stop after this step without finishing the schedule (0 = off)
    log_every: int = 10             # steps between log.txt lines
    max_nan_in_a_row: int = 5       # non-finite losses in a row that stop the run
    eval: bool = True               # linear and attentive probes at the end (evaluate.evaluate_stage1)
    probe_train_clips: int = 600    # training clips the probes are fitted on
    probe_steps: int = 150          # AdamW steps of each attentive probe

    # Defaults that depend on the preset, (toy, full): the full column is official (SM/run_pretraining.py:141-146);
    # the toy trains 1200 steps, not 301 epochs (the video-teacher term leaves a plateau near 1.1 only after about 400
    # steps, and speed is learnt after that), and hides 30% of each frame, not 80% (16 patches a frame: at 80% the
    # moving object is mostly hidden, and the more of its path the student sees the sooner it learns speed;
    # results/toyworld_motion.md, README differences). img_size and drop_path: the preset's.
    BY_PRESET = {"lr": (1.2e-2, 1.5e-4), "min_lr": (1e-4, 1e-5), "mask_ratio": (0.3, 0.8)}

    def validate(self):
        check(self.teacher_dtype in ("auto", "float32", "bfloat16", "float16", "float8", "float8_tensor"),
              "--teacher_dtype must be auto, float32, bfloat16, float16, float8 or float8_tensor, "
              f"got {self.teacher_dtype!r}")
        check(self.mae_teacher_attention in ("standard", "official"),
              f"--mae_teacher_attention must be standard or official, got {self.mae_teacher_attention!r}")
        check(self.mask_type in MASK_TYPES, f"--mask_type must be attention, tube or random, got {self.mask_type!r}")
        check(self.batch_size > 0 and self.grad_accum > 0, "--batch_size and --grad_accum must be positive")
        check(self.max_steps >= 0 and self.warmup_steps >= 0, "--max_steps and --warmup_steps must be >= 0")
        check(len(self.teacher_steps) == 2, "--teacher_steps wants two step counts: (CLIP, motion classes)")
        check(0.0 < self.crop_scale <= 1.0, f"--crop_scale must be in (0, 1], got {self.crop_scale}")
        check(self.preset in VISION_PRESETS, f"--preset must be one of {list(VISION_PRESETS)}, got {self.preset!r}")
        by_preset(self, self.BY_PRESET, 0 if self.preset == "toy" else 1)
        check(0.0 <= self.mask_ratio < 1.0, f"--mask_ratio must be in [0, 1), got {self.mask_ratio}")
        base = VISION_PRESETS[self.preset]
        self.img_size = preset_img_size(self.preset, base, self.img_size)
        self.drop_path = base.drop_path if self.drop_path < 0 else self.drop_path


def main(argv=None):
    cfg = parse_config(Stage1Config(), sys.argv[1:] if argv is None else argv, __doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    claim_run_dir(cfg.out_dir, rt, cfg.resume, cfg.overwrite)
    out_dir = Path(cfg.out_dir)

    # ---- data ---------------------------------------------------------------------------------
    prepare_toyworld(cfg.data, rt)
    vcfg = vision_preset(cfg.preset, num_frames=cfg.num_frames, img_size=cfg.img_size, drop_path=cfg.drop_path)
    T, Np = vcfg.grid[0], vcfg.grid[1] * vcfg.grid[2]
    train_set = VideoTextDataset(sample_file(cfg.data, "train"), 2 * cfg.num_frames, vcfg.img_size, train=True,
                                 seed=cfg.seed, skip_bad=cfg.skip_bad_samples, data_root=cfg.data_root or None,
                                 cache=FRAME_CACHE[cfg.frame_cache], cache_mb=cfg.frame_cache_mb, noise_grid=(T, Np),
                                 crop_scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip)

    # ---- teachers (frozen, outside the student) ------------------------------------------------
    clip_ckpt, mae_ckpt = cfg.clip_teacher_ckpt, cfg.mae_teacher_ckpt
    if not cfg.random_teachers:
        clip_ckpt = clip_ckpt or (str(TOYS / "toy_clip_teacher.pt") if cfg.clip_teacher == "toy" else "")
        mae_ckpt = mae_ckpt or (str(TOYS / "toy_mae_teacher.pt") if cfg.mae_teacher == "toy" else "")
        if not (clip_ckpt and mae_ckpt):
            raise SystemExit("full-size teachers need --clip_teacher_ckpt and --mae_teacher_ckpt "
                             "(or --random_teachers=True for benchmarking)")
        missing_toy = [p for p in (clip_ckpt, mae_ckpt) if not Path(p).exists() and "toy_" in Path(p).name]
        if missing_toy and rt.master:
            print0(f"toy teachers missing ({', '.join(missing_toy)}): pre-training them on {cfg.data} first")
            pretrain_toy_teachers(cfg.data, Path(missing_toy[0]).parent, *cfg.teacher_steps, seed=cfg.seed)
        barrier(rt)
    teachers = build_teachers(cfg.clip_teacher, cfg.mae_teacher, clip_ckpt or None, mae_ckpt or None,
                              cfg.mae_teacher_attention)
    teachers.to(rt.device, rt.frozen_dtype if cfg.teacher_dtype == "auto" or cfg.teacher_dtype.startswith("float8")
                else pick_dtype(rt.device, cfg.teacher_dtype))       # float8: all but the Linears in auto's dtype
    if cfg.teacher_dtype.startswith("float8"):      # e4m3 Linears (fp8.py), quantised on the device from those weights
        print0(float8_teachers(teachers, per_token=cfg.teacher_dtype == "float8"), rt=rt)
    check(teachers.clip.cfg.dim == vcfg.clip_teacher_dim and teachers.mae.cfg.dim == vcfg.mae_teacher_dim
          and teachers.clip.cfg.pool_dim == vcfg.clip_teacher_final_dim,
          f"the student's heads ({vcfg.clip_teacher_dim}, {vcfg.clip_teacher_final_dim}, {vcfg.mae_teacher_dim}) "
          f"do not match the teachers' widths; pair toy with toy and full presets with full teachers")
    check(teachers.clip.cfg.clip_return_layers == vcfg.clip_return_layers
          and teachers.mae.cfg.mae_return_layers == vcfg.mae_return_layers,
          "the student and the teachers must return the same number of layers")

    # ---- student, optimizer, resume ----------------------------------------------------------
    student = InternVideo2(vcfg, with_heads=True).to(rt.device)
    student.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    if cfg.compile:
        compile_blocks(student), compile_blocks(teachers.clip), compile_blocks(teachers.mae)
    settings = dict(mask_type=cfg.mask_type, mask_ratio=cfg.mask_ratio, w_clip=cfg.w_clip,
                    w_clip_final=cfg.w_clip_final, w_mae=cfg.w_mae)
    model = WithLoss(student, lambda student, batch: stage1_objective(student, teachers, batch, **settings))
    if cfg.fsdp:
        shard(model, rt)                                               # before the optimizer sees it
    global_batch = cfg.batch_size * cfg.grad_accum * rt.world
    lr_scale = global_batch / 256                                      # SM/run_pretraining.py:351-353
    optimizer = build_optimizer(student, cfg.lr * lr_scale, cfg.weight_decay, (0.9, cfg.beta2), 1e-6,
                                student.no_weight_decay(), rt.device.type)
    scaler = rt.make_scaler()
    step, ck = resume(out_dir, student, optimizer, scaler, rt, cfg, stage=1) if cfg.resume else (0, None)
    if cfg.resume and (done := finished_run(out_dir, step, cfg.max_steps, rt)) is not None:
        return done
    if cfg.init_from and ck is None:                   # a run's start; a resumed one continues its own checkpoint
        ck0 = load_checkpoint(cfg.init_from)
        check_init_from(ck0, cfg.init_from, ("stage-1 checkpoint", "released stage-1 module"), stage=1)
        state = stage1_student_state(student, ck0, cfg.init_from, log=lambda msg: print0(msg, rt=rt))
        load_state(student, None, {"model": state})
    log = RunLog(out_dir, cfg, rt, resume=step > 0)
    print0(f"student {cfg.preset}:\n{param_table(student)}\nteachers: {cfg.clip_teacher} "
           f"{count_params(teachers.clip) / 1e6:.2f}M + {cfg.mae_teacher} {count_params(teachers.mae) / 1e6:.2f}M "
           f"(frozen) | {rt.device} {rt.dtype} world {rt.world} | global batch {global_batch} "
           f"| lr {cfg.lr * lr_scale:.2e}", rt=rt)

    model = distribute(model, rt, find_unused=not (cfg.w_clip and cfg.w_clip_final and cfg.w_mae))

    # ---- train ---------------------------------------------------------------------------------
    def save(step, nan_skips):
        save_checkpoint(out_dir / "ckpt.pt", {
            "stage": 1, "step": step, "model": model_state(student), "optimizer": optimizer_state(student, optimizer),
            "scaler": scaler.state_dict() if scaler else None, "config": asdict(cfg),
            "model_config": asdict(vcfg), "nan_skips": nan_skips}, rt)

    loader = iter(train_loader(train_set, cfg.batch_size, rt.rank, rt.world, cfg.seed,
                               start=step * cfg.grad_accum, workers=cfg.workers))
    student.train()
    result = training_loop(
        model, optimizer, loader, rt, cfg, step=step, scaler=scaler, log=log, save=save, desc="stage 1",
        lr_at=lambda s: cosine_lr(s, cfg.max_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr) * lr_scale,
        clips_per_step=global_batch, bad_lines=train_set.n_bad_lines,
        nan_skips=ck.get("nan_skips", 0) if ck else 0)

    save_pictures(out_dir, lambda: {"loss.png": loss_figure({"stage 1": result}),
                                    "masks.png": stage1_mask_figure(teachers, train_set[0], vcfg.grid, cfg.mask_ratio)},
                  rt)

    # ---- evaluate ------------------------------------------------------------------------------
    metrics = {"stage": 1, "preset": cfg.preset, **run_summary(result, cfg.max_steps)}
    if cfg.eval and result["step"] == cfg.max_steps and cfg.fsdp and rt.ddp:
        print0(f"--fsdp: no end-of-run probes (sharded forwards would need equal batches on every rank); "
               f"evaluate with: python train_stage1.py --init_from={out_dir / 'ckpt.pt'} --max_steps=0 "
               f"--out_dir={out_dir}_eval", rt=rt)
    elif cfg.eval and result["step"] == cfg.max_steps:
        metrics.update(evaluate_stage1(student, teachers, cfg, vcfg, rt))
    return finish(out_dir, metrics, rt, lambda k: k.startswith(("probe_acc", "mean_probe_acc")) or k == "probe_chance", log)


if __name__ == "__main__":
    cli(main)
