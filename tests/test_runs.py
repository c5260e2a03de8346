"""runs.py and the loop's guards. Nothing lost, nothing silent: run folders are protected (one run per folder, no
overwrite by accident, --resume only with the options it was started with), Ctrl-C saves a checkpoint, a step with
a non-finite loss is skipped and counted (on the host, or on the device by the fused AdamW), every bad option or
file is one line, metrics.json is strict JSON, and DDP logs the loss terms averaged over the ranks."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common import ConfigError, CheckpointError, Runtime, WithLoss, train_step, training_loop
from runs import NanGuard, config_differences, write_json

ROOT = Path(__file__).resolve().parents[1]


def _stage1(toyworld, out, *extra):
    return [f"--data={toyworld}", f"--out_dir={out}", "--random_teachers=True", "--batch_size=4", "--workers=0",
            "--eval=False", "--log_every=1", "--warmup_steps=1", *extra]


def test_run_folders_are_protected_and_resume_checks_the_options(toyworld, tmp_path):
    from train_stage1 import main
    main(_stage1(toyworld, tmp_path, "--max_steps=2"))
    with pytest.raises(ConfigError, match="holds another run .*--resume.*--overwrite"):
        main(_stage1(toyworld, tmp_path, "--max_steps=2"))
    with pytest.raises(ConfigError, match=r"other options \(--seed: 0 in the checkpoint, 3 now\)"):
        main(_stage1(toyworld, tmp_path, "--max_steps=4", "--resume", "--seed=3"))
    assert main(_stage1(toyworld, tmp_path, "--max_steps=2", "--resume"))["steps"] == 2    # finished: its metrics
    main(_stage1(toyworld, tmp_path, "--max_steps=3", "--resume", "--log_every=2"))        # safe to change
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 3
    log = (tmp_path / "log.txt").read_text()
    assert log.count("# config") == 2                                  # both runs appended, nothing truncated
    main(_stage1(toyworld, tmp_path, "--max_steps=1", "--overwrite"))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 1
    with pytest.raises(ConfigError, match="is a stage-1 checkpoint, not a stage-2 one"):
        from train_stage2 import main as main2
        main2([f"--data={toyworld}", f"--out_dir={tmp_path}", "--resume", "--max_steps=2"])


def test_one_run_per_folder_at_a_time(toyworld, tmp_path):
    from train_stage1 import main
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(f"{sleeper.pid} {os.uname().nodename} 2026-12-02T00:00:00\n")
        with pytest.raises(ConfigError, match=f"in use by process {sleeper.pid}"):
            main(_stage1(toyworld, tmp_path, "--max_steps=1"))
    finally:
        sleeper.kill()
        sleeper.wait()
    main(_stage1(toyworld, tmp_path, "--max_steps=1"))                 # its process is gone: the lock is taken over
    assert (tmp_path / "ckpt.pt").exists()


def test_config_differences_name_what_changed():
    assert config_differences({"lr": 1e-3, "max_steps": 5, "frames": [4, 8]}, {"lr": 1e-3, "max_steps": 9,
                                                                            "frames": (4, 8)}) == []
    assert config_differences({"lr": 1e-3}, {"lr": 2e-3}) == ["--lr: 0.001 in the checkpoint, 0.002 now"]


def test_sigint_saves_a_checkpoint_and_resume_continues(toyworld, tmp_path):
    cmd = [sys.executable, str(ROOT / "train_stage1.py"), *_stage1(toyworld, tmp_path, "--max_steps=400",
                                                                    "--ckpt_every=1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "log.txt"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.exists() and "step 3/" in log.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, out[-2000:]
    assert "SIGINT: checkpoint saved at step" in out and "Traceback" not in out
    step = torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"]
    assert 3 <= step < 400
    assert "SIGINT at step" in log.read_text()


def test_non_finite_loss_skips_the_step_and_stops_after_several():
    rt = Runtime(torch.device("cpu"), torch.float32)
    net = torch.nn.Linear(3, 1)
    before = net.weight.clone()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    nan_fn = lambda m, b: ((m(b) * float("nan")).sum(), {})
    loss, _, _, ok = train_step(WithLoss(net, nan_fn), [torch.ones(2, 3)], opt, rt)
    assert not ok and torch.equal(net.weight, before) and net.weight.grad is None
    guard = NanGuard(limit=3)
    guard.update(False)
    guard.update(True)                                       # a good step resets the run of failures
    guard.update(False)
    guard.update(False)
    assert guard.check(3) == 3                               # read when the loop logs: 3 skipped, 2 in a row
    guard.update(False)
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row"):
        guard.check(4)
    assert guard.total == 4


def _nan_at(steps):
    """A linear net and a loss of it, with one term, that is NaN at the given calls (counted from 0)."""
    calls, net = [], torch.nn.Linear(3, 1)

    def fn(m, b):
        calls.append(0)
        loss = m(b["x"]).square().mean() * (float("nan") if len(calls) - 1 in steps else 1.0)
        return loss, {"sq": loss}
    return net, WithLoss(net, fn)


def test_the_fused_adamw_skips_a_non_finite_step_without_the_host(monkeypatch):
    """The fused AdamW (build_optimizer's on CUDA; on a CPU here, the same found_inf contract) skips the update and
    keeps its step count where the loss is not finite, and train_step reads nothing on the host to decide."""
    rt = Runtime(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    net, model = _nan_at({1})
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    x = [{"x": torch.ones(2, 3)}]
    train_step(model, x, opt, rt, grad_clip=1.0)
    weights, state = ({k: v.clone() for k, v in d.items()} for d in (net.state_dict(), opt.state[net.weight]))
    with monkeypatch.context() as m:
        for read in ("item", "__bool__", "__float__", "tolist"):
            m.setattr(torch.Tensor, read, lambda *a: pytest.fail("train_step read a tensor on the host"))
        loss, parts, _, ok = train_step(model, x, opt, rt, grad_clip=1.0)
    assert not ok and loss.isnan() and not hasattr(opt, "found_inf")
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in opt.state[net.weight].items())        # step count 1 again
    loss, _, _, ok = train_step(model, x, opt, rt, grad_clip=1.0)
    assert ok and opt.state[net.weight]["step"] == 2 and not torch.equal(net.weight, weights["weight"])


@pytest.mark.parametrize("fused", [False, True], ids=["host", "fused"])
def test_the_loop_counts_skipped_steps_at_log_steps(fused, capsys):
    rt = Runtime(torch.device("cpu"), torch.float32)
    cfg = SimpleNamespace(max_steps=6, stop_after=0, grad_accum=1, grad_clip=1.0, max_nan_in_a_row=3, log_every=4,
                          ckpt_every=100)

    def loop(nan_steps):
        torch.manual_seed(0)
        net, model = _nan_at(nan_steps)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused)
        batches = iter(lambda: {"x": torch.ones(2, 3), "n_bad": 0}, None)
        return training_loop(model, opt, batches, rt, cfg, step=0, lr_at=lambda s: 0.1, scaler=None, log=lines.append,
                             save=lambda *a: saved.append(a), desc="test", clips_per_step=2, progress=False)
    lines, saved = [], []
    result = loop({2, 3})
    assert result["nan_skips"] == 2 and saved == [(6, 2)] and len(result["history"]) == 6
    assert [math.isnan(h) for h in result["history"]] == [False, False, True, True, False, False]
    assert all(type(h) is float for h in result["history"]) and result["parts"][0]["sq"] == result["history"][0]
    assert "| 2 steps skipped" in lines[0] and "step 4: 2 steps with a non-finite loss" in capsys.readouterr().err
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 4"):
        loop({0, 1, 2})


def test_bad_options_and_files_are_one_line(toyworld, tmp_path):
    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
        return p.returncode, p.stderr.strip().splitlines()
    rc, err = run("train_stage1.py", "--bogus=1")
    assert rc == 2 and err == ["error: unknown option --bogus (see --help)"]
    for bad in ("--ckpt_every=0", "--log_every=0", "--stop_after=-5", "--lr=-3", "--workers=-1", "--device=tpu",
                "--img_size=33", "--num_frames=0"):
        rc, err = run("train_stage1.py", bad, f"--out_dir={tmp_path / 'x'}")
        assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {bad.split('=')[0]}"), (bad, err)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    rc, err = run("train_stage2.py", f"--init_from={tmp_path / 'notes.txt'}", f"--out_dir={tmp_path / 'y'}",
                  f"--data={toyworld}")
    assert rc == 1 and len(err) == 1 and "is not a readable checkpoint" in err[0], err
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}}, tmp_path / "teacher.pt")
    rc, err = run("train_stage1.py", f"--init_from={tmp_path / 'teacher.pt'}", f"--out_dir={tmp_path / 'z'}",
                  f"--data={toyworld}")
    assert rc == 2 and err == [f"error: --init_from={tmp_path / 'teacher.pt'} is a teacher; stage 1 starts from a "
                               f"stage-1 checkpoint or a released stage-1 module"], err


def test_init_from_refuses_the_wrong_stage(toyworld, tmp_path):
    from train_stage2 import main
    torch.save({"stage": 3, "model": {}}, tmp_path / "s3.pt")
    with pytest.raises(ConfigError, match="is a stage-3 checkpoint; stage 2 starts from a stage-1 checkpoint"):
        main([f"--data={toyworld}", f"--out_dir={tmp_path / 'o'}", f"--init_from={tmp_path / 's3.pt'}"])


def test_metrics_json_is_strict(tmp_path):
    write_json(tmp_path / "m.json", {"loss_first": float("nan"), "acc": 0.5, "hist": [1.0, float("inf")]})
    text = (tmp_path / "m.json").read_text()
    m = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    assert m["loss_first"] is None and m["acc"] == 0.5 and m["hist"] == [1.0, None]
    assert "loss_first" in m["_non_finite"]


def test_checkpoint_errors_are_key_errors_with_plain_messages():
    e = CheckpointError("x does not fit")
    assert isinstance(e, KeyError) and str(e) == "x does not fit"


def test_a_full_disk_is_named_and_the_last_checkpoint_kept(tmp_path, monkeypatch):
    import errno
    from common import save_checkpoint, setup_runtime
    rt = setup_runtime("cpu", "float32", 0)
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 1}, rt)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write .*No space left on device.*previous checkpoint is intact"):
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 2}, rt)
    monkeypatch.undo()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 1 and not (tmp_path / "ckpt.pt.tmp").exists()
