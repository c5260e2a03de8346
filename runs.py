"""runs.py: what protects a training run, so that nothing is lost and nothing fails silently.

  claim_run_dir       one run per folder: <out_dir>/run.lock, and no new run over another run's results unless
                      --resume or --overwrite says so
  config_differences  --resume only with the options the run was started with (SAFE_TO_CHANGE lists the exceptions)
  finished_run        --resume of a finished run returns its metrics instead of training no steps
  StopSignal          Ctrl-C / SIGTERM finish the step, save a checkpoint and stop (exit 128 + the signal)
  NanGuard            a step with a non-finite loss is skipped, counted, and too many in a row stop the run
  write_json          metrics.json is strict JSON: NaN and inf become null and are named

The stage scripts call claim_run_dir and finished_run; common.training_loop, resume and finish use the rest.
Tested by tests/test_runs.py.
"""
import atexit
import datetime
import json
import math
import os
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def claim_run_dir(out_dir, rt, resume=False, overwrite=False):
    """One run per folder, and nothing overwritten by accident. Rank 0 takes <out_dir>/run.lock (naming its process;
    a lock whose process is gone is taken over; our own process may re-enter, as tests and notebooks call main()
    again), and refuses a new run into a folder that holds another run's results unless --resume or --overwrite.
    The lock goes when the process exits."""
    from common import ConfigError
    if not rt.master:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock, me = out_dir / "run.lock", f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, f"{me} {datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
            os.close(fd)
            atexit.register(lambda: lock.exists() and lock.read_text().startswith(me) and lock.unlink())
            break
        except FileExistsError:
            owner = lock.read_text().split()
            if owner[:2] == me.split():
                break                                                  # this process, an earlier main() call
            pid, host = (int(owner[0]), owner[1]) if len(owner) >= 2 and owner[0].isdigit() else (0, "")
            if host == socket.gethostname() and not _alive(pid):
                lock.unlink(missing_ok=True)                           # left by a killed run: take it over
                continue
            raise ConfigError(f"--out_dir={out_dir} is in use by process {pid} on {host or '?'} ({lock}); wait for "
                              f"it, use another --out_dir, or delete {lock} if that run is gone")
    if resume or overwrite:
        return
    results = [p for p in [out_dir / "ckpt.pt", out_dir / "metrics.json", *sorted(out_dir.glob("substage*/ckpt.pt"))]
               if p.exists()]
    if results:
        raise ConfigError(f"--out_dir={out_dir} holds another run ({', '.join(str(p) for p in results)}): continue "
                          f"it with --resume, replace it with --overwrite, or choose another --out_dir")


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# options a resumed run may change: how long, how often to log and save, how to load data, what to evaluate
SAFE_TO_CHANGE = {"max_steps", "stop_after", "substage", "log_every", "ckpt_every", "eval", "eval_batch",
                  "workers", "resume", "overwrite", "out_dir", "init_from", "vision_from", "compile", "skip_bad_samples",
                  "frame_cache", "frame_cache_mb", "max_nan_in_a_row", "rerank_k"}


def config_differences(saved, now):
    """['--lr: 0.001 in the checkpoint, 0.002 now', ...] for every option that differs and is not safe to change
    (SAFE_TO_CHANGE). saved, now: config dicts (asdict)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if k not in SAFE_TO_CHANGE and (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out.append(f"--{k}: {a!r} in the checkpoint, {b!r} now")
    return out


def finished_run(out_dir, step, max_steps, rt):
    """--resume of a run that already reached max_steps: its metrics.json, untouched, instead of a run of no steps
    (whose summary would have no losses). None when there is still something to do."""
    from common import cleanup, print0
    path = Path(out_dir) / "metrics.json"
    if step < max_steps or step == 0 or not path.exists():
        return None
    print0(f"--resume: {out_dir} finished at step {step} already (max_steps {max_steps}); its metrics: {path}", rt=rt)
    cleanup(rt)
    return json.loads(path.read_text())


class StopSignal:
    """SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop cleanly (a second Ctrl-C kills at
    once). One process looks at its flag before every step. Under DDP the ranks must stop at the same step, so they
    agree only at log steps (one all-reduce of the flag, which waits for the device): a signal stops the run at
    most log_every steps later."""

    def __enter__(self):
        self.hit, self.old = 0, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:                                 # not the main thread (a notebook kernel thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.hit = signum
        signal.signal(signum, self.old.get(signum, signal.SIG_DFL))

    def stop_now(self, rt, at_log_step):
        if rt.ddp:
            if not at_log_step:
                return False
            flag = torch.tensor(float(self.hit), device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.hit = int(flag.item())
        return bool(self.hit)

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


class NanGuard:
    """Counts the skipped (non-finite) steps and stops the run after `limit` in a row. update() runs every step on
    the device, without waiting for it; check() reads the counts when the loop logs, names the steps skipped since
    the last check on stderr, and raises if a run of `limit` happened (so the run stops at that log step)."""

    def __init__(self, limit=5, total=0, device="cpu"):
        self.limit, self.reported = limit, total
        self.total = torch.tensor(total, device=device)                   # skipped steps, in every run of this folder
        self.in_a_row = torch.tensor(0, device=device)                    # skipped steps ending at the last one
        self.longest = torch.tensor(0, device=device)                     # the longest run since the last check

    def update(self, ok):
        """ok: the step's flag (a bool tensor from common.train_step, or a bool)."""
        bad = (~torch.as_tensor(ok, device=self.total.device)).long()
        self.total += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def check(self, step):
        """Returns how many steps were skipped since the last check; raises FloatingPointError after `limit` in a
        row."""
        total, longest = torch.stack([self.total, self.longest]).tolist()
        new, self.reported, self.longest = total - self.reported, total, self.in_a_row.clone()
        if new:
            print(f"step {step}: {new} steps with a non-finite loss skipped since the last log ({total} so far)",
                  file=sys.stderr, flush=True)
        if longest >= self.limit:
            raise FloatingPointError(f"{longest} non-finite losses in a row at step {step}: stopping. "
                                     f"Check the data of these steps, lower the lr, or use --dtype=float32 to "
                                     f"rule out precision.")
        return new


def _finite_or_none(obj, bad):
    """JSON has no NaN or inf: such floats become null, their keys collected in `bad`."""
    if isinstance(obj, dict):
        return {k: (bad.append(k) or None) if isinstance(v, float) and not math.isfinite(v) else _finite_or_none(v, bad)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [None if isinstance(v, float) and not math.isfinite(v) else _finite_or_none(v, bad) for v in obj]
    return obj


def write_json(path, obj):
    """Strict JSON, written atomically: non-finite numbers are written as null and named under "_non_finite"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = []
    obj = _finite_or_none(json.loads(json.dumps(obj, default=float)), bad)
    if bad and isinstance(obj, dict):
        obj["_non_finite"] = f"NaN or inf, written as null: {', '.join(bad)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)
