"""common.py: the training plumbing every stage shares, written once.

  config      dataclass configs with typed `--key=value` overrides and `--help` (no exec)
  runtime     device and precision choice, torchrun/DDP set-up (nccl on CUDA, gloo on CPU), seeds
  optimizer   AdamW with the official no-weight-decay rule, warmup + cosine schedule
  loop        training_loop and train_step: the loop every stage runs, one optimizer step over micro-batches
              (no_sync accumulation, AMP, NaN/inf skip, clip); it reads the device only when it logs
  state       atomic checkpoints, full resume state (model, optimizer, scaler, step, RNG per rank)
  logging     print0, log.txt (config, git commit, torch, device), metrics.json

What protects a run (the run.lock, --resume's option check, Ctrl-C saves, the NaN guard, strict JSON) is in
runs.py; FSDP2 sharding and the step's few FSDP-only lines are in fsdp.py.

Every stage script reads: cfg = parse_config(Cfg(), argv) -> rt = setup_runtime(...) -> ... ->
training_loop(DDP(WithLoss(model, the stage's objective from losses.py)), ...) -> finish(...).
Nothing here imports a stage script.
"""
import ast
import datetime
import difflib
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from fsdp import average_replicated, clip_gradients, gradient_sync, is_sharded, repeated_blocks
from runs import NanGuard, StopSignal, config_differences, write_json


# ------------------------------------------------------------------------------------------------
# config

class ConfigError(ValueError):
    """A bad command-line option or config value; the message names it."""


class CheckpointError(KeyError):
    """A checkpoint that cannot be read or does not fit; the message names the file and the keys. A KeyError, as
    a missing key is what it mostly is, but printed as its plain message."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def cli(main):
    """Run a script's main() so that a bad option, input or checkpoint ends in one line on stderr, not a traceback:
    exit code 2 for a bad option (ConfigError), 1 for bad data or a checkpoint that does not fit, 130 for Ctrl-C
    outside training (training itself saves and stops cleanly: runs.StopSignal). Everything else still raises."""
    from data import DataError
    try:
        return main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _field_help(cls):
    """The trailing `# comment` of each dataclass field, read from the source, for --help."""
    helps = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.*)$", src, flags=re.M):
            helps[m.group(1)] = m.group(2).strip()
    return helps


def _convert(key, raw, old):
    if isinstance(old, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} wants True or False, got {raw!r}")
    if isinstance(old, str):
        return raw
    try:
        new = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key} wants a {type(old).__name__}, got {raw!r}") from None
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        new = float(new)
    if isinstance(old, tuple) and isinstance(new, list):
        new = tuple(new)
    if type(new) is not type(old):
        raise ConfigError(f"--{key} wants a {type(old).__name__}, got {raw!r}")
    return new


def parse_config(cfg, argv, doc=""):
    """Apply `--key=value` overrides (`--flag` alone means True) to a dataclass instance.
    Unknown keys and wrong types raise ConfigError with a suggestion; --help prints every key.
    An old spelling in the config's ALIASES ({old: today's name}) still works and says its new name once."""
    names = [f.name for f in fields(cfg)]
    aliases = getattr(cfg, "ALIASES", {})
    if any(a in ("-h", "--help") for a in argv):
        helps = _field_help(type(cfg))
        print(doc.strip() + "\n\noptions (--key=value):")
        for n in names:
            print(f"  --{n}={getattr(cfg, n)!r:<24} {helps.get(n, '')}")
        if aliases:
            print("old spellings: " + ", ".join(f"--{old} is --{new}" for old, new in aliases.items()))
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key=value, got {arg!r} (see --help)")
        key, eq, raw = arg[2:].partition("=")
        if key in aliases:
            if os.environ.get("RANK", "0") == "0":              # once, not once per torchrun process
                print(f"--{key} is now --{aliases[key]}")
            key = aliases[key]
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else "")
                              + " (see --help)")
        old = getattr(cfg, key)
        if not eq:
            if not isinstance(old, bool):
                raise ConfigError(f"--{key} needs a value: --{key}=...")
            raw = "True"
        setattr(cfg, key, _convert(key, raw, old))
    _check_shared(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _check_shared(cfg):
    """The options every stage has, checked once here (each named, before anything runs)."""
    positive = ("ckpt_every", "log_every", "batch_size", "grad_accum", "eval_batch", "max_nan_in_a_row", "num_frames")
    defaults = {f.name: f.default for f in fields(cfg)}
    number = lambda name: isinstance(getattr(cfg, name, None), (int, float)) and not isinstance(getattr(cfg, name), bool)
    for name in positive:                         # where the default is 0 ("by preset"), 0 stays allowed
        if number(name):
            v = getattr(cfg, name)
            check(v > 0 or v == 0 == defaults.get(name), f"--{name} must be positive, got {v}")
    for name in ("stop_after", "workers", "max_steps", "weight_decay", "grad_clip"):
        if number(name):
            check(getattr(cfg, name) >= 0, f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr"):                 # -1 = by preset; any other value must be a real learning rate
        if number(name):
            v = getattr(cfg, name)
            check(v == -1 or v >= 0 and (v > 0 or name == "min_lr"),
                  f"--{name} must be positive (or -1 for the preset's), got {v}")
    if hasattr(cfg, "frame_cache"):
        check(cfg.frame_cache in ("auto", "on", "off"), f"--frame_cache must be auto, on or off, got {cfg.frame_cache!r}")
        check(cfg.frame_cache_mb > 0, f"--frame_cache_mb must be positive, got {cfg.frame_cache_mb}")
    if hasattr(cfg, "device"):
        d = cfg.device
        check(d in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", d),
              f"--device must be auto, cpu, cuda, cuda:N or mps, got {d!r}")


def check(ok, msg):
    """Config validation helper: raise ConfigError(msg) unless ok."""
    if not ok:
        raise ConfigError(msg)


def preset_img_size(name, preset, img_size):
    """--img_size of a run of the vision preset `preset` (model.VISION_PRESETS[name]): 0 = the preset's; any other
    size must cut into whole patches (ConfigError)."""
    size = img_size or preset.img_size
    check(size % preset.patch_size == 0, f"--img_size must be a multiple of the {name} preset's {preset.patch_size} px "
          f"patches, got {size}")
    return size


def by_preset(cfg, table, column):
    """Resolve the settings whose default depends on the preset: every field named in `table` that
    still holds its dataclass default (the "by preset" marker, -1, 0 or ()) becomes
    table[field][column], so the saved and logged config holds the values the run used."""
    for f in fields(cfg):
        if f.name in table and getattr(cfg, f.name) == f.default:
            setattr(cfg, f.name, table[f.name][column])


# ------------------------------------------------------------------------------------------------
# runtime: device, precision, distributed

@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype          # autocast dtype (float32 = no autocast)
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    ddp: bool = False

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def frozen_dtype(self):
        """Storage dtype of frozen weights (teachers, the LLM in stage 3): bf16 under bf16 autocast,
        where matmuls run in bf16 anyway; fp32 otherwise (fp16 weights could overflow)."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32

    def make_scaler(self):
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        return torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and self.device.type == "cuda" else None


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device, name="auto"):
    """CUDA: bf16 autocast, fp16 (+ GradScaler) where bf16 is missing. CPU/MPS: fp32 unless asked;
    bf16 autocast on a CPU only pays off with AVX512-BF16 or AMX (2x faster there, 6x SLOWER on
    CPUs without them)."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name != "auto":
        if name not in table:
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}")
        return table[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def setup_runtime(device="auto", dtype="auto", seed=0, timeout_s=1800):
    """Single process, or DDP when launched by torchrun (RANK in the environment)."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    ddp = "RANK" in os.environ                  # under torchrun, DDP even on one process
    dev = pick_device(device)
    if ddp:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
    elif dev.type == "cuda":
        torch.cuda.set_device(dev.index or 0)
    torch.manual_seed(seed + rank)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, pick_dtype(dev, dtype), rank, local_rank, world, ddp)


def barrier(rt):
    """Wait for every rank (a no-op in one process): after rank 0 wrote shared files (ToyWorld, toys)."""
    if rt.ddp:
        dist.barrier()


def cleanup(rt):
    if rt.ddp and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def distribute(model, rt, find_unused=False):
    """DDP under torchrun (every rank holds the whole model; gradients all-reduced in buckets
    during backward), unchanged otherwise or when the model is already FSDP-sharded (fsdp.shard)."""
    if not rt.ddp or is_sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def print0(*args, rt=None, **kw):
    if rt is None or rt.master:
        print(*args, **kw, flush=True)


# ------------------------------------------------------------------------------------------------
# optimizer and schedule

def build_optimizer(model, lr, weight_decay, betas, eps, no_decay_names=(), device_type="cpu"):
    """AdamW. No weight decay for 1-D tensors (norms, LayerScale, biases), any `.bias`, and the named parameters
    (position tables, CLS, temperature), as the official (SM/optim_factory.py:66-71; MM/utils/optimizer.py:17-28)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split(".")[-1]
        if p.ndim < 2 or name.endswith(".bias") or name in no_decay_names or short in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device_type == "cuda")


def cosine_lr(step, total, warmup, lr, min_lr, start_lr=0.0):
    """Linear warmup from start_lr to lr over `warmup` steps, then cosine from lr to min_lr."""
    if step < warmup:
        return start_lr + (lr - start_lr) * step / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * p)) * (lr - min_lr)


def set_lr(optimizer, lr):
    for g in optimizer.param_groups:
        g["lr"] = lr


def fit(desc, params, loss_at, steps, lr, weight_decay=0.01, betas=(0.9, 0.999), history=None, verbose=True):
    """The small AdamW loop (warmup over a tenth, cosine to lr / 100) that pre-trains the toy teachers
    and stand-ins; not the stages' loop. loss_at(step) -> loss. Returns the last loss as a float."""
    from tqdm import tqdm
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    history = [] if history is None else history
    bar = tqdm(range(steps), desc=desc, file=sys.stdout, disable=not verbose, dynamic_ncols=True, mininterval=0.5)
    for step in bar:
        set_lr(opt, cosine_lr(step, steps, max(1, steps // 10), lr, lr / 100))
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


# ------------------------------------------------------------------------------------------------
# the loop

class WithLoss(torch.nn.Module):
    """A model and its loss function as one module, so that DDP (whose hooks are set up in its
    forward) sees the whole loss computation: WithLoss(model, fn)(batch) = fn(model, batch)."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def training_loop(model, optimizer, loader, rt, cfg, *, step, lr_at, scaler, log, save, desc, clips_per_step,
                  nan_skips=0, progress=True, bad_lines=0):
    """The loop every stage runs: set lr -> grad_accum micro-batches -> train_step -> NaN guard ->
    progress bar (loss terms, lr, clips/s) -> log.txt every cfg.log_every -> checkpoint every
    cfg.ckpt_every and at the end. Stops at cfg.max_steps, or earlier at cfg.stop_after.
    The losses stay on the device and are read in one go when the loop logs (every cfg.log_every steps
    and at the last), so it does not wait for the GPU in between; the timing (ms a step, clips/s) is
    the mean since the last log, and the bar's figures change at log steps.
    save(step, nan_skips) writes the checkpoint; progress=False hides the bar (notebooks).
    SIGINT/SIGTERM save at a step boundary and exit 128 + the signal (runs.StopSignal).
    Returns {history, parts, n_bad, bad_lines, step, nan_skips}, the losses as floats."""
    from tqdm import tqdm
    last = cfg.max_steps if not cfg.stop_after else min(cfg.max_steps, cfg.stop_after)
    guard = NanGuard(cfg.max_nan_in_a_row, nan_skips, rt.device)
    timer, n_bad, history, parts_history, since = Timer(rt.device), 0, [], [], step
    pending = []                 # each step's (loss, grad norm, *terms), still on the device
    bar = tqdm(total=last, initial=step, desc=desc, disable=not (rt.master and progress), file=sys.stdout, dynamic_ncols=True,
               mininterval=0.5)
    with StopSignal() as stop:
        while step < last:
            if stop.stop_now(rt, at_log_step=step % cfg.log_every == 0):
                save(step, int(guard.total))
                bar.close()
                name = signal.Signals(stop.hit).name
                log(f"{name} at step {step}: checkpoint saved, stopped")
                print0(f"\n{name}: checkpoint saved at step {step}; continue with --resume", rt=rt)
                cleanup(rt)
                sys.exit(128 + stop.hit)
            lr = lr_at(step)
            set_lr(optimizer, lr)
            micro = [next(loader) for _ in range(cfg.grad_accum)]
            n_bad += sum(b["n_bad"] for b in micro)
            loss, parts, gnorm, ok = train_step(model, micro, optimizer, rt, scaler, cfg.grad_clip)
            guard.update(ok)
            step += 1
            pending.append(torch.stack([loss, gnorm.float(), *parts.values()]))
            bar.update(1)
            if step % cfg.log_every == 0 or step == last:
                dt = timer.lap() / (step - since)                     # seconds a step, averaged since the last log
                rows, pending, since = torch.stack(pending).tolist(), [], step    # waits for the device
                history += [r[0] for r in rows]
                parts_history += [dict(zip(parts, r[2:])) for r in rows]
                skipped = guard.check(step)                           # raises after max_nan_in_a_row in a row
                terms, speed = parts_history[-1].items(), clips_per_step / dt
                bar.set_postfix_str(" ".join(f"{k} {v:.3f}" for k, v in terms) + f" lr {lr:.1e} {speed:.0f} clips/s")
                log(f"step {step}/{cfg.max_steps} | loss {history[-1]:.4f} (" + " ".join(f"{k} {v:.4f}" for k, v in terms)
                    + f") | lr {lr:.2e} | grad norm {rows[-1][1]:.3f} | {dt * 1000:.0f} ms | {speed:.1f} clips/s"
                    + (f" | {skipped} steps skipped (non-finite loss)" if skipped else ""))
            if step % cfg.ckpt_every == 0 or step == last:
                save(step, int(guard.total))
    bar.close()
    if n_bad or bad_lines:
        print0(f"skipped {n_bad} unreadable samples (replaced by the next readable one) and {bad_lines} malformed "
               f"lines of the sample file (each named on stderr)", rt=rt)
    return {"history": history, "parts": parts_history, "n_bad": n_bad, "bad_lines": bad_lines, "step": step,
            "nan_skips": int(guard.total)}


def train_step(model, micro_batches, optimizer, rt, scaler=None, grad_clip=0.0):
    """Forward/backward every micro-batch (DDP gradient sync only on the last one: `no_sync` covers
    forward AND backward), then a NaN/inf guard agreed by all ranks, unscale, clip, step.

    model(batch) -> (loss, {name: tensor}) (a WithLoss, maybe under DDP), each batch moved to the
    device first. Returns (loss, parts, grad_norm, ok) as tensors on the device, for training_loop to read
    when it logs; ok False means the step was skipped because some rank saw a non-finite loss. With the fused
    AdamW (CUDA) the skip happens on the device; elsewhere the host reads the flag (free on a CPU) and skips."""
    n = len(micro_batches)
    total = torch.zeros((), device=rt.device)
    parts = {}
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, rt.device)
        with grad_sync(model, rt, i == n - 1):
            with rt.autocast():
                loss, p = model(batch)
            (scaler.scale(loss / n) if scaler else loss / n).backward()
        total += loss.detach().float() / n
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v.detach().float() / n
    finite = torch.isfinite(total).float()
    if rt.ddp:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        dist.all_reduce(total)
        total /= rt.world
        if parts:                             # the terms as the total: averaged over ranks, not rank 0's own
            names = sorted(parts)
            stacked = torch.stack([torch.as_tensor(parts[k], device=rt.device).float() for k in names])
            dist.all_reduce(stacked)
            parts = dict(zip(names, stacked / rt.world))
    # The fused AdamW skips its update, and keeps its step count, where optimizer.found_inf is 1, as GradScaler
    # has it do (torch/optim/adam.py, _fused_adam): no host sync. GradScaler (fp16) reads its own flag anyway.
    on_device = scaler is None and optimizer.defaults.get("fused")
    grad_norm = torch.full((), float("nan"), device=rt.device)
    if on_device or finite.item():
        average_replicated(model, rt)                        # FSDP: the scalars left out of the sharding
        if scaler:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if grad_clip > 0:
            grad_norm = (clip_gradients if is_sharded(model) else torch.nn.utils.clip_grad_norm_)(params, grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        elif on_device:
            optimizer.found_inf = 1 - finite
            optimizer.step()
            del optimizer.found_inf
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, parts, grad_norm, finite.bool()


def grad_sync(model, rt, sync):
    """Gradient synchronisation only on the last micro-batch: DDP's no_sync() (which must cover the
    forward too) on the others; FSDP2 has its own switch (fsdp.gradient_sync)."""
    if not rt.ddp:
        return nullcontext()
    if is_sharded(model):
        gradient_sync(model, sync)
        return nullcontext()
    return nullcontext() if sync else model.no_sync()


def to_device(x, device):
    """A batch (dict) with every tensor on `device`, non-blocking from pinned memory; the rest as is."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def run_summary(result, max_steps):
    """The metrics every stage reports about its training run: the loss and each of its terms at the
    first step and averaged over the last 10."""
    h, parts = result["history"], result.get("parts", [])
    out = {"steps": result["step"], "loss_first": h[0] if h else None,
           "loss_last": sum(h[-10:]) / len(h[-10:]) if h else None,
           "nan_skips": result["nan_skips"], "bad_samples": result["n_bad"], "bad_lines": result.get("bad_lines", 0),
           "finished": result["step"] == max_steps}
    for k in (parts[0] if parts else {}):
        out[f"loss_first_{k}"] = parts[0][k]
        out[f"loss_last_{k}"] = sum(p[k] for p in parts[-10:]) / len(parts[-10:])
    return out


# ------------------------------------------------------------------------------------------------
# speed: regional compilation, half-precision storage of frozen weights

def compile_blocks(model):
    """Regional compilation (`--compile`): torch.compile each repeated block (fsdp.repeated_blocks:
    the transformer blocks, the decoders) in place, not the whole model. Identical blocks share one
    compiled graph, so InternViT-6B's 48 blocks compile about as fast as one; the glue around them
    (masking, gathers, losses, DDP hooks) stays eager, and the step has no graph breaks to reason
    about. Returns the number of modules compiled."""
    blocks = repeated_blocks(model)
    for blk in blocks:
        blk.compile()
    return len(blocks)


def store_frozen(module, dtype):
    """Keep a frozen network's weights in `dtype` (bf16 under bf16 autocast): half the memory, and
    no per-step fp32 -> bf16 weight casts (7 GB of them for InternViT-6B). Trainable parameters
    (LoRA adapters) keep fp32. A no-op for fp32."""
    if dtype == torch.float32:
        return module
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    return module


# ------------------------------------------------------------------------------------------------
# checkpoints and resume state

def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["cpu"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def gather_objects(obj, rt):
    """Every rank's object, in rank order (a list of one without DDP)."""
    if not rt.ddp:
        return [obj]
    out = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def model_state(model):
    """The whole, unsharded state dict: model.state_dict(), or under FSDP the shards gathered to full
    tensors on the CPU (a collective: every rank calls it; rank 0 gets the tensors)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer):
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state(model, optimizer, ck):
    """Inverse of model_state/optimizer_state (optimizer None = weights only): under FSDP rank 0's
    full tensors are broadcast and re-sharded."""
    if not is_sharded(model):
        model.load_state_dict(ck["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ck["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, ck["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, ck["optimizer"], options=opts)


def save_checkpoint(path, state, rt):
    """Atomic write on the master: a killed run leaves the previous checkpoint intact.
    Call on every rank (RNG states are gathered from all ranks into state['rng'])."""
    state = dict(state, rng=gather_objects(rng_state(), rt), world=rt.world)
    if rt.master:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:          # a full disk surfaces as either, deep inside torch.save
            tmp.unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free / 2**20
            raise CheckpointError(f"cannot write {path} ({type(e).__name__}: {str(e).splitlines()[0][:160]}; "
                                  f"{free:.0f} MiB free there); the previous checkpoint is intact") from None
    if rt.ddp:
        dist.barrier()


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} holds a {type(ck).__name__}, not a checkpoint (a dict of tensors)")
    return ck


def restore_rng(ckpt, rt):
    """Restore this rank's RNG when the world size matches; otherwise keep the fresh seeds."""
    states = ckpt.get("rng") or []
    if ckpt.get("world") == rt.world and len(states) == rt.world:
        set_rng_state(states[rt.rank])
    else:
        print0(f"resume: world size changed ({ckpt.get('world')} -> {rt.world}); RNG re-seeded", rt=rt)


def resume(out_dir, model, optimizer, scaler, rt, cfg=None, stage=None):
    """Restore <out_dir>/ckpt.pt exactly (weights, optimizer, scaler, RNG of every rank), after checking it is this
    stage's and that its config agrees with `cfg` (a dataclass) on every option not in runs.SAFE_TO_CHANGE
    (ConfigError naming each difference). Returns (step, checkpoint) or (0, None) when there is nothing to resume."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.exists():
        print0(f"--resume: no {path} yet, starting from scratch", rt=rt)
        return 0, None
    ck = load_checkpoint(path)
    if stage is not None and ck.get("stage") != stage:
        raise ConfigError(f"--resume: {path} is a {'stage-%s' % ck['stage'] if ck.get('stage') else 'foreign'} "
                          f"checkpoint, not a stage-{stage} one")
    if cfg is not None and ck.get("config"):
        diff = config_differences(ck["config"], asdict(cfg))
        if diff:
            raise ConfigError(f"--resume: {path} was written with other options ({'; '.join(diff)}); run with "
                              f"those, or start a new run in another --out_dir")
    if getattr(cfg, "init_from", ""):       # every stage's rule: --init_from starts a run, a run's checkpoint continues it
        print0(f"--resume: continuing {path}, not --init_from={cfg.init_from} (which only starts a run)", rt=rt)
    load_state(model, optimizer, ck)
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    restore_rng(ck, rt)
    print0(f"resumed from {path} at step {ck['step']}", rt=rt)
    return ck["step"], ck


# ------------------------------------------------------------------------------------------------
# logging

def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


class RunLog:
    """<out_dir>/log.txt: a header (command, config, git commit, torch, device) then one line per
    logged step. Written by the master only."""

    def __init__(self, out_dir, cfg, rt, resume=False):
        self.rt, self.path = rt, Path(out_dir) / "log.txt"
        if not rt.master:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:                      # appended, never truncated: each run has its header
            f.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n")
            f.write(f"# git {git_commit()} | torch {torch.__version__} | device {device_name(rt.device)} "
                    f"| dtype {rt.dtype} | world {rt.world}{' (DDP)' if rt.ddp else ''}\n")
            f.write(f"# config {json.dumps(asdict(cfg))}\n")

    def __call__(self, msg):
        if self.rt.master:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def finish(out_dir, metrics, rt, show, log=None):
    """The end of every stage run: rank 0 writes <out_dir>/metrics.json (and its log line) and prints
    the headline figures, the float metrics whose names pass show(name); every rank then leaves DDP."""
    if rt.master:
        write_json(Path(out_dir) / "metrics.json", metrics)
        if log:
            log(f"metrics {metrics}")
        print0(f"metrics -> {Path(out_dir) / 'metrics.json'}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in metrics.items() if show(k) and isinstance(v, float)))
    cleanup(rt)
    return metrics


class Timer:
    """Wall-clock seconds between calls, synchronising CUDA first so GPU work is counted."""

    def __init__(self, device):
        self.device, self.t = device, time.perf_counter()

    def lap(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
