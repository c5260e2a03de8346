"""bench.py: how fast each stage trains, and whether the data loader keeps up.

N optimizer steps on random inputs through a stage's real models, teachers, masking and losses (the
objective functions the stage scripts train, losses.stage*_objective, through common.train_step),
then a one-line report: step time (median),
clips/s, MFU, peak memory, and the time of each part of the step. `--stage=loader` instead measures
how many clips/s the DataLoader decodes and augments per worker; `--stage=decode` times one video file's
decoders side by side (ours, the whole-file decode it replaced, decord and torchcodec where they load), each in a
fresh process: clips/s for one worker and the peak memory its decoding adds.

    python bench.py                                   # stage 1, toy presets, CPU: seconds
    python bench.py --stage=2 --preset=toy
    python bench.py --stage=1 --preset=1B --clip_teacher=internvit-6b --mae_teacher=videomae-g \\
        --batch_size=16 --compile                     # the official stage-1 recipe, one GPU
    python bench.py --stage=1 ... --teacher_dtype=float8   # the same with FP8 teachers, + their fidelity vs bf16
    python bench.py --stage=2 --preset=1B --text=bert-large --batch_size=128 --compile
    python bench.py --stage=3 --preset=1B --qformer=base --llm=mistral-7b --batch_size=8 --compile
    python bench.py --stage=loader --data=data/toyworld --workers=0,1,2
    python bench.py --stage=loader --make_frames=64 --data=/tmp/frames224 --img_size=224 --workers=1,4,8
    python bench.py --stage=decode                   # 8 frames at 224 px from a 10-s 480p H.264 file it writes
    python bench.py --stage=decode --video=my.mp4 --num_frames=16

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records every matmul,
convolution and attention call of one real eager step (forward + backward) with its shapes, at
2 FLOPs per multiply-add (attention: its two batched matmuls, 4*B*H*Nq*Nk*hd forward, 2.5x that
backward; element-wise work, norms, softmax and the optimizer are not counted, the usual MFU
convention). MFU = counted FLOPs per step / step time / the device's dense bf16 peak (PEAK_BF16,
the spec sheet; None on unknown devices and on CPUs). `mfu_matmul` divides by the bf16 matmul
throughput measured on the device instead (a large square matmul), which is what the anchors in
README use (800 TFLOP/s on an H100). Each part's time comes from CUDA events recorded around it
inside the real step (no extra synchronisation), or from the wall clock on a CPU.

Stage 1 with `--teacher_dtype=float8` (or float8_tensor) first runs the teachers and the objective on the fixed
batch in --frozen_dtype, converts the teachers' Linears to e4m3 (fp8.float8_teachers), runs them again, and
reports the targets' cosine similarity (mean over tokens) and the loss's relative change; then times the FP8 step.
MFU stays relative to the bf16 peak.

`--out=FILE` appends one JSON line per run (scripts/gpu_check.sh collects them into the README
table).
"""
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from common import (cli, WithLoss, build_optimizer, check, compile_blocks, device_name, parse_config, setup_runtime,
                    store_frozen, train_step)

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' spec sheets. The first key that
# is a substring of torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


@dataclass
class BenchConfig:
    stage: str = "1"                # 1 | 2 | 3 | loader | decode
    preset: str = "toy"             # vision preset: toy | S | B | L | 1B | 6B
    clip_teacher: str = "toy"       # stage 1: toy | internvit-6b (random weights)
    mae_teacher: str = "toy"        # stage 1: toy | videomae-g (random weights)
    text: str = "toy"               # stage 2: toy | bert-base | bert-large
    audio: str = "none"             # stage 2: none | toy | beats-base
    qformer: str = "toy"            # stage 3: toy | base
    llm: str = "toy"                # stage 3: toy | mistral-7b
    substage: int = 3               # stage 3: which sub-stage's step (1, 2, 3)
    num_frames: int = 0             # 0 = the stage's recipe (8, 4, 8)
    img_size: int = 0               # 0 = the preset's
    mask_ratio: float = 0.8         # stage 1 attention masking / stage 2 random masking
    text_len: int = 32              # stage 2 caption tokens; stage 3 instruction tokens
    llm_len: int = 512              # stage 3 LLM sequence length (96 visual slots included)
    batch_size: int = 8             # clips per step
    steps: int = 5                  # measured steps (the median is reported)
    warmup: int = 2                 # unmeasured steps first (compilation happens here)
    compile: bool = False           # regional torch.compile (common.compile_blocks)
    grad_ckpt_blocks: int = 0       # activation checkpointing for the first N vision blocks
    frozen_dtype: str = "auto"      # teachers / frozen LLM storage: auto (bf16 under bf16 autocast) | float32
    teacher_dtype: str = "auto"     # stage 1: auto (= frozen_dtype) | float8 | float8_tensor (e4m3 Linears; fidelity)
    device: str = "auto"            # auto | cpu | cuda
    dtype: str = "auto"             # auto (CUDA bf16, else fp32) | float32 | bfloat16
    count_flops: bool = True        # count FLOPs on one eager step (MFU)
    profile: bool = False           # print the top ops of one profiled step (torch.profiler)
    # loader
    data: str = "data/toyworld"     # folder with train.jsonl
    workers: str = "0,1,2"          # worker counts to try
    loader_batches: int = 20        # batches timed per worker count
    make_frames: int = 0            # first write this many synthetic clips as 256-px JPEG frame folders to --data
    # decode
    video: str = ""                 # the file to decode; empty = write a 10-s 480p 30-fps H.264 clip to a temp dir
    decoders: str = "ours,whole_file,decord,torchcodec"   # those that cannot be imported are reported as such
    decode_clips: int = 12          # clips timed per decoder (half evaluation picks, half training picks)
    out: str = ""                   # append the result as one JSON line to this file

    def validate(self):
        check(self.stage in ("1", "2", "3", "loader", "decode"),
              f"--stage must be 1, 2, 3, loader or decode, got {self.stage!r}")
        check(self.substage in (1, 2, 3), "--substage must be 1, 2 or 3")
        check(self.batch_size > 0 and self.steps > 0 and self.warmup >= 0, "--batch_size, --steps must be > 0")
        check(self.frozen_dtype in ("auto", "float32"), "--frozen_dtype must be auto or float32")
        check(self.teacher_dtype in ("auto", "float8", "float8_tensor"),
              f"--teacher_dtype must be auto, float8 or float8_tensor, got {self.teacher_dtype!r}")
        check(self.teacher_dtype == "auto" or self.stage == "1", "--teacher_dtype is a stage-1 option")
        if not self.num_frames:
            self.num_frames = {"1": 8, "2": 4, "3": 8, "loader": 8, "decode": 8}[self.stage]


# ------------------------------------------------------------------------------------------------
# part timing and FLOP counting

class Parts:
    """Wall time of named parts of a step without synchronising inside it: CUDA events recorded
    around each part, read after the step's own synchronisation; plain wall clock on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending, self.times = [], {}

    def wrap(self, fn, name):
        def timed(*args, **kw):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kw)
                end.record()
                self.pending.append((name, start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kw)
                self.times.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return timed

    def collect(self):
        """Call after a synchronisation: move the events' times into self.times (seconds)."""
        for name, start, end in self.pending:
            self.times.setdefault(name, []).append(start.elapsed_time(end) / 1000)
        self.pending = []

    def reset(self):
        self.pending, self.times = [], {}


def _attention_flops(q_at, backward):
    """FLOP formula for the fused SDPA kernels that also accepts grouped-query attention (fewer K/V
    heads than query heads; torch's own formula asserts equal heads): the two matmuls, QK^T and PV,
    are 4 * B * Hq * Nq * Nk * hd FLOPs forward, and the backward's five 2.5 times that."""
    def formula(*args, out_shape=None, **kw):
        (b, h, nq, d), nk = args[q_at], args[q_at + 1][-2]
        return int(4 * b * h * nq * nk * d * (2.5 if backward else 1.0))
    return formula


def count_flops(fn):
    """FLOPs of fn() (forward and backward if it runs both), from the ops it dispatches."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):                   # forward: (q, k, v, ...); backward: (grad_out, q, k, v, ...)
            mapping[getattr(aten, name)] = _attention_flops(0, False)
            mapping[getattr(aten, name + "_backward")] = _attention_flops(1, True)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, n=8192, reps=20):
    """bf16 FLOP/s of a large square matmul on this GPU: what the tensor cores really deliver."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ------------------------------------------------------------------------------------------------
# one stage's model, optimizer, loss and random batch

def build_stage1(cfg, rt, parts):
    from losses import stage1_objective
    from model import InternVideo2, vision_preset
    from teachers import build_teachers
    vcfg = vision_preset(cfg.preset, num_frames=cfg.num_frames, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    with torch.device(rt.device):                         # built on the device: 7B parameters init in seconds
        teachers = build_teachers(cfg.clip_teacher, cfg.mae_teacher)
        student = InternVideo2(vcfg, with_heads=True)
    teachers.to(rt.device, frozen_dtype(cfg, rt))
    student.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    optimizer = build_optimizer(student, 1e-4, 0.05, (0.9, 0.98), 1e-6, student.no_weight_decay(), rt.device.type)
    timed_teachers = parts.wrap(teachers, "teachers forward")
    model = WithLoss(student, lambda student, batch: stage1_objective(student, timed_teachers, batch,
                                                                      mask_ratio=cfg.mask_ratio))
    T, Np = vcfg.grid[0], vcfg.grid[1] * vcfg.grid[2]

    def batch(B):
        S = vcfg.img_size
        return {"video": torch.randn(B, 3, 2 * cfg.num_frames, S, S, device=rt.device),
                "mask_noise": torch.rand(B, T, Np, device=rt.device)}
    flops_of = {"teachers forward": lambda b: teachers(b["video"])}
    extra = {} if cfg.teacher_dtype == "auto" else float8_fidelity(cfg, rt, student, teachers, batch(cfg.batch_size))
    return model, optimizer, batch, flops_of, {"student": student}, [student, teachers.clip, teachers.mae], extra


def float8_fidelity(cfg, rt, student, teachers, batch):
    """What FP8 teachers change, on one fixed batch, then converts them in place (fp8.float8_teachers): per
    target, the mean over tokens (layers, clips) of the cosine similarity between the FP8 teachers' targets and the
    same teachers' in --frozen_dtype (bf16 on CUDA, fp32 on a CPU), and the stage-1 loss of the same student (eval
    mode: no drop path) on the same batch and mask noise with each (attention masking follows each one's attn)."""
    import torch.nn.functional as F
    from losses import stage1_objective
    from fp8 import float8_teachers

    def run():
        mode = student.training
        with torch.no_grad(), rt.autocast():
            student.eval()
            loss = stage1_objective(student, teachers, batch, mask_ratio=cfg.mask_ratio)[0].item()
            target = teachers(batch["video"])
        student.train(mode)
        return target, loss
    ref, ref_loss = run()
    line = float8_teachers(teachers, per_token=cfg.teacher_dtype == "float8")
    out, loss = run()
    cos = {k: F.cosine_similarity(out[k].float(), ref[k].float(), dim=-1).mean().item()
           for k in ("clip", "clip_final", "mae")}
    return {"float8": line, "fp8_target_cos": cos, "fp8_loss": loss, "ref_loss": ref_loss,
            "fp8_loss_rel_diff": (loss - ref_loss) / ref_loss}


def build_stage2(cfg, rt, parts):
    """The official stage-2 step: stage2_objective's defaults (VTC, VTM, MLM, + AVTC, AVTM, AVMLM with
    audio; one caption type) on Stage2Model's official widths."""
    from losses import stage2_objective
    from model import Stage2Model, audio_preset, text_preset, vision_preset
    vcfg = vision_preset(cfg.preset, num_frames=cfg.num_frames, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    tcfg = text_preset(cfg.text, **({"vocab_size": 1000} if cfg.text == "toy" else {}))
    acfg = None if cfg.audio == "none" else audio_preset(cfg.audio)
    with torch.device(rt.device):
        model = Stage2Model(vcfg, tcfg, acfg)
    if acfg:
        store_frozen(model.audio_encoder.requires_grad_(False), frozen_dtype(cfg, rt))
    model.vision_encoder.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    optimizer = build_optimizer(model, 5e-5, 0.05, (0.9, 0.98), 1e-8, model.no_weight_decay(), rt.device.type)
    tok = SimpleNamespace(mask_id=4, cls_id=2)           # the only ids the masked LM needs
    wrapped = WithLoss(model, lambda model, batch: stage2_objective(model, batch, tok=tok, mask_ratio=cfg.mask_ratio))
    T, Np = vcfg.grid[0], vcfg.grid[1] * vcfg.grid[2]

    def batch(B):
        S, L, dev = vcfg.img_size, cfg.text_len, rt.device
        ids = torch.randint(5, tcfg.vocab_size, (B, L), device=dev)   # full-length captions: the worst case
        ids[:, 0] = 2
        out = {"video": torch.randn(B, 3, cfg.num_frames, S, S, device=dev), "ids_caption": ids,
               "mask_noise": torch.rand(B, T, Np, device=dev), "mask_caption": torch.ones_like(ids),
               "pos_caption": torch.arange(B, device=dev)}
        if acfg:
            out["fbank"] = torch.randn(B, acfg.frames, acfg.mel_bins, device=dev)
        return out
    return wrapped, optimizer, batch, {}, {"model": model}, [model], {}


def build_stage3(cfg, rt, parts):
    from losses import stage3_objective
    from model import LLM_PRESETS, QFORMER_PRESETS, Stage3Model, add_lora, vision_preset
    vcfg = vision_preset(cfg.preset, num_frames=cfg.num_frames, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    qcfg = replace(QFORMER_PRESETS[cfg.qformer], **({"vocab_size": 1000} if cfg.qformer == "toy" else {}))
    lcfg = replace(LLM_PRESETS[cfg.llm], **({"vocab_size": 1000} if cfg.llm == "toy" else {}))
    with torch.device(rt.device):
        model = Stage3Model(vcfg, qcfg, lcfg)
        if cfg.substage == 3:
            add_lora(model.llm)
    model.set_trainable(cfg.substage)
    store_frozen(model.llm, frozen_dtype(cfg, rt))
    model.vision_encoder.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    optimizer = build_optimizer(model, 1e-4, 0.02, (0.9, 0.999), 1e-8, model.no_weight_decay(cfg.substage),
                                rt.device.type)
    video_at, n_visual = 6, qcfg.num_query + qcfg.extra_query   # slots after "<s> [INST] <Video>"
    wrapped = WithLoss(model, lambda model, batch: stage3_objective(model, batch, substage=cfg.substage,
                                                                    video_at=video_at))
    check(cfg.llm_len > video_at + n_visual + 8, f"--llm_len must exceed the {n_visual} visual slots")
    def batch(B):
        S, L, dev = vcfg.img_size, cfg.llm_len, rt.device
        ids = torch.randint(5, lcfg.vocab_size, (B, L), device=dev)
        labels = torch.full_like(ids, -100)
        labels[:, -L // 4:] = ids[:, -L // 4:]            # the answer: the last quarter of the tokens
        t_ids = torch.randint(5, qcfg.vocab_size, (B, cfg.text_len), device=dev)
        t_mask = torch.ones_like(t_ids)
        return {"video": torch.randn(B, 3, cfg.num_frames, S, S, device=dev), "llm_ids": ids, "llm_labels": labels,
                "llm_mask": torch.ones_like(ids), "qf_ids": t_ids, "qf_mask": t_mask, "ids_caption": t_ids,
                "mask_caption": t_mask, "pos_caption": torch.arange(B, device=dev)}
    return wrapped, optimizer, batch, {}, {"model": model}, [model], {}


def frozen_dtype(cfg, rt):
    return rt.frozen_dtype if cfg.frozen_dtype == "auto" else torch.float32


# ------------------------------------------------------------------------------------------------
# the benchmarks

def bench_stage(cfg):
    rt = setup_runtime(cfg.device, cfg.dtype, seed=0)
    parts = Parts(rt.device)
    build = {"1": build_stage1, "2": build_stage2, "3": build_stage3}[cfg.stage]
    t0 = time.perf_counter()
    model, optimizer, make_batch, part_flops, nets, compiled, extra = build(cfg, rt, parts)
    n_params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    n_train = sum(p.numel() for v in nets.values() for p in v.parameters() if p.requires_grad)
    optimizer.step = parts.wrap(optimizer.step, "optimizer")
    build_s = time.perf_counter() - t0
    batch = make_batch(cfg.batch_size)

    def step(b=batch):
        return train_step(model, [b], optimizer, rt, None, grad_clip=3.0)

    flops = sub_flops = None
    if cfg.count_flops:
        # One eager step on 2 clips, scaled to the batch: model FLOPs, so activation checkpointing's
        # recomputation is switched off while counting (MFU, not hardware FLOPs utilisation).
        n, small = min(2, cfg.batch_size), make_batch(min(2, cfg.batch_size))
        ckpt = [(m, m.grad_ckpt_blocks) for m in model.modules() if hasattr(m, "grad_ckpt_blocks")]
        for m, _ in ckpt:
            m.grad_ckpt_blocks = 0
        flops = count_flops(lambda: step(small)) * cfg.batch_size / n          # before compiling: eager
        with rt.autocast():
            sub_flops = {k: count_flops(lambda: fn(small)) * cfg.batch_size / n for k, fn in part_flops.items()}
        for m, k in ckpt:
            m.grad_ckpt_blocks = k
        parts.reset()
    if cfg.compile:
        for net in compiled:
            compile_blocks(net)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        step()
    warm_s = time.perf_counter() - t0
    parts.reset()
    times, losses = [], []
    for _ in range(cfg.steps):
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step()[0]                                  # a tensor on the device, read after the timing
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss)
        parts.collect()
    dt = statistics.median(times)
    if cfg.profile:
        from torch.profiler import ProfilerActivity, profile
        cuda = rt.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=15, max_name_column_width=60), flush=True)
    peak = peak_flops(rt.device)
    measured_peak = matmul_peak(rt.device) if rt.device.type == "cuda" else None
    res = {
        "stage": cfg.stage, "preset": cfg.preset, "device": device_name(rt.device), "dtype": str(rt.dtype),
        "torch": torch.__version__, "batch_size": cfg.batch_size, "num_frames": cfg.num_frames,
        "compile": cfg.compile, "grad_ckpt_blocks": cfg.grad_ckpt_blocks, "frozen_dtype": str(frozen_dtype(cfg, rt)),
        "params_M": {k: round(v / 1e6, 1) for k, v in n_params.items()}, "trainable_M": round(n_train / 1e6, 1),
        "step_s": dt, "step_s_all": times, "clips_per_s": cfg.batch_size / dt,
        "tflops_per_clip": flops / cfg.batch_size / 1e12 if flops else None,
        "achieved_tflops": flops / dt / 1e12 if flops else None,
        "mfu": flops / dt / peak if flops and peak else None,
        "matmul_peak_tflops": measured_peak / 1e12 if measured_peak else None,
        "mfu_matmul": flops / dt / measured_peak if flops and measured_peak else None,
        "parts_s": {k: statistics.median(v) for k, v in parts.times.items()},
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2 ** 30 if rt.device.type == "cuda"
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20),
        "loss_finite": all(math.isfinite(x) for x in losses), "build_s": build_s, "warmup_s": warm_s,
        "teacher_dtype": cfg.teacher_dtype, **extra,
    }
    if sub_flops:
        res["tflops_per_clip_parts"] = {k: v / cfg.batch_size / 1e12 for k, v in sub_flops.items()}
    rest = dt - sum(res["parts_s"].values())
    res["parts_s"]["rest (forward + backward)"] = rest
    return res


def bench_loader(cfg):
    """Clips/s of the training DataLoader (decode, sample frames, random resized crop, normalise,
    collate) for each worker count, decoding every clip from disk (no frame cache)."""
    from data import VideoTextDataset, train_loader
    root = Path(cfg.data)
    if cfg.make_frames:
        make_frame_folders(root, cfg.make_frames)
    size = cfg.img_size or 224
    ds = VideoTextDataset(root / "train.jsonl", cfg.num_frames, size, train=True, seed=0, cache=False)
    res = {"stage": "loader", "data": str(root), "clips": len(ds), "img_size": size, "num_frames": cfg.num_frames,
           "batch_size": cfg.batch_size, "cpu_count": os.cpu_count(), "clips_per_s": {}}
    for w in [int(x) for x in str(cfg.workers).split(",")]:
        it = iter(train_loader(ds, cfg.batch_size, 0, 1, seed=0, start=0, workers=w))
        for _ in range(1 + 4 * w):                        # drain what the workers prefetched while starting
            next(it)
        n = max(cfg.loader_batches, 4 * w)                # workers deliver in bursts: time several rounds
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        res["clips_per_s"][w] = n * cfg.batch_size / (time.perf_counter() - t0)
        del it
    return res


def _decode_worker(name, path, num_frames, short_side, clips, queue):
    """One decoder in a fresh process: `clips` reads of num_frames frames shrunk to short_side (alternately the
    evaluation and a training pick); puts (seconds per clip, median; peak RSS growth in MiB) or an error line."""
    import numpy as np
    from data import frame_indices, read_frames, shrink_frame

    def status_mib(key):                   # VmRSS (now) or VmHWM (peak since the last reset), Linux
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    try:
        if name == "ours":                  # keyframe seeks, only the picks converted, shrunk by swscale
            import av  # noqa: F401          (imported before the baseline, as the others' libraries are)

            def read(pick):
                return read_frames(path, pick, short_side=short_side)
        elif name == "whole_file":          # the reader before: every frame to RGB, then the picks
            import av

            def read(pick):
                with av.open(path) as c:
                    frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
                return np.stack([shrink_frame(frames[i], short_side) for i in pick(len(frames))])
        elif name == "decord":
            import decord

            def read(pick):
                vr = decord.VideoReader(path, num_threads=1)
                return np.stack([shrink_frame(f, short_side) for f in vr.get_batch(pick(len(vr))).asnumpy()])
        elif name == "torchcodec":
            from torchcodec.decoders import VideoDecoder

            def read(pick):
                d = VideoDecoder(path, dimension_order="NHWC")
                batch = d.get_frames_at(pick(len(d))).data.numpy()
                return np.stack([shrink_frame(f, short_side) for f in batch])
        else:
            raise ValueError(f"unknown decoder {name!r}")
        rng = np.random.default_rng(0)
        with open("/proc/self/clear_refs", "w") as f:   # reset the peak: the imports' own peak does not count
            f.write("5")
        base, times = status_mib("VmRSS"), []   # libraries imported, nothing decoded (the median skips a slow first)
        for i in range(clips):
            t0 = time.perf_counter()
            out = read(lambda n: frame_indices(n, num_frames, train=bool(i % 2), rng=rng))
            times.append(time.perf_counter() - t0)
        assert out.shape[0] == num_frames
        queue.put((sorted(times)[len(times) // 2], max(0.0, status_mib("VmHWM") - base)))
    except Exception as e:                  # not installed, or its libraries missing: one line for the report
        queue.put(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")


def bench_decode(cfg):
    """Clips/s (one process, median over --decode_clips) and the peak memory growth of each decoder on one file."""
    import multiprocessing as mp
    import tempfile
    path = cfg.video
    if not path:
        from data import index_clip, write_video
        path = str(Path(tempfile.mkdtemp()) / "clip_10s_480p.mp4")
        write_video(path, index_clip(300, 480, 640), fps=30, options={"crf": "23"})   # x264 defaults otherwise
    short_side = cfg.img_size or 224
    res = {"stage": "decode", "video": path, "num_frames": cfg.num_frames, "short_side": short_side,
           "clips": cfg.decode_clips, "decoders": {}}
    ctx = mp.get_context("spawn")          # a fresh process each: peak memory is the decoder's alone
    for name in cfg.decoders.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=_decode_worker, args=(name, path, cfg.num_frames, short_side, cfg.decode_clips, q))
        p.start()
        got = q.get()
        p.join()
        res["decoders"][name] = ({"clips_per_s": 1 / got[0], "s_per_clip": got[0], "peak_mib": got[1]}
                                 if isinstance(got, tuple) else {"error": got})
    return res


def make_frame_folders(root, n, size=256, frames=16):
    """n synthetic clips as folders of JPEG frames (the pre-extracted-frames layout) + train.jsonl."""
    import numpy as np
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            d = root / "frames" / f"clip_{i:05d}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)   # smooth-ish images
            for t in range(frames):
                img = Image.fromarray(np.roll(base, t, axis=1)).resize((size, size), Image.BILINEAR)
                img.save(d / f"{t:03d}.jpg", quality=90)
            f.write(json.dumps({"video": f"frames/clip_{i:05d}", "caption": f"clip {i}", "id": i}) + "\n")


def report(res):
    if res["stage"] == "decode":
        rows = [f"  {k:<11} " + (f"{v['clips_per_s']:6.1f} clips/s ({v['s_per_clip'] * 1000:.0f} ms a clip), "
                                 f"peak memory +{v['peak_mib']:.0f} MiB" if "error" not in v else f"not run: {v['error']}")
                for k, v in res["decoders"].items()]
        return (f"decode {res['video']}: {res['num_frames']} frames at {res['short_side']} px, one process, median of "
                f"{res['clips']} clips\n" + "\n".join(rows))
    if res["stage"] == "loader":
        per = ", ".join(f"{w} workers {v:.1f}" for w, v in res["clips_per_s"].items())
        return f"loader {res['data']} ({res['img_size']} px, {res['num_frames']} frames): clips/s {per}"
    fmt = lambda x, f: "n/a" if x is None else format(x, f)
    parts = " | ".join(f"{k} {v * 1000:.0f} ms" for k, v in res["parts_s"].items())
    gflops = res["tflops_per_clip"] and res["tflops_per_clip"] * 1e3
    return (f"stage {res['stage']} {res['preset']} batch {res['batch_size']} on {res['device']} ({res['dtype']}, "
            f"compile {res['compile']}): {res['step_s'] * 1000:.0f} ms/step, {res['clips_per_s']:.1f} clips/s, "
            f"{fmt(gflops, '.1f')} GFLOP/clip, MFU {fmt(res['mfu'], '.1%')} "
            f"(of measured matmul peak {fmt(res['mfu_matmul'], '.1%')}), peak mem {res['peak_mem_gib']:.1f} GiB\n"
            f"  parts: {parts}" + (fidelity_line(res) if "fp8_target_cos" in res else ""))


def fidelity_line(res):
    cos = ", ".join(f"{k} {v:.6f}" for k, v in res["fp8_target_cos"].items())
    return (f"\n  {res['float8']}\n  FP8 vs {res['frozen_dtype']} teachers, fixed batch: target cosine (mean over "
            f"tokens) {cos}; stage-1 loss {res['fp8_loss']:.6f} vs {res['ref_loss']:.6f} "
            f"({res['fp8_loss_rel_diff']:+.2e} relative)")


def main(argv=None):
    cfg = parse_config(BenchConfig(), sys.argv[1:] if argv is None else argv, __doc__)
    res = {"loader": bench_loader, "decode": bench_decode}.get(cfg.stage, bench_stage)(cfg)
    print(report(res), flush=True)
    if cfg.out:
        with open(cfg.out, "a") as f:
            f.write(json.dumps({"config": asdict(cfg), **res}, default=str) + "\n")
    return res


if __name__ == "__main__":
    cli(main)
