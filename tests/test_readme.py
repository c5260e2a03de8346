"""README's "Use the pieces" block runs as written: every stage's objective on one ToyWorld batch."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_use_the_pieces_block_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use the pieces"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert len(block.strip().splitlines()) < 40
    monkeypatch.chdir(tmp_path)                                      # its small ToyWorld goes here
    exec(compile(block, "README.md (Use the pieces)", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    for stage, terms in (("1", ("clip", "clip_final", "mae")), ("2", ("vtc", "vtm", "mlm", "atc")), ("3", ("answer",))):
        line = next(l for l in out.splitlines() if l.startswith(f"stage {stage} "))
        assert all(f"'{t}'" in line for t in terms), line
    quoted = float(re.search(r"It prints `stage 1 ([0-9.]+)", readme).group(1))      # the figure README quotes
    assert abs(float(out.split("stage 1 ")[1].split()[0]) - quoted) < 2e-3


def test_your_own_videos_block_runs_as_written(tmp_path, monkeypatch):
    """README's "Your own videos": a folder of mp4 files (ToyWorld written as such) -> stage-2 fine-tuning with the
    sound read from the files -> retrieval figures -> saved features -> a probe on `label`, each line as written
    (run from a folder where `toys/` is the repository's)."""
    import json
    import shlex
    import subprocess
    import sys

    import numpy as np
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own videos"):]
    lines = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("python ") for line in lines)
    (tmp_path / "toys").symlink_to(ROOT / "toys")
    for line in lines:
        argv = shlex.split(line)
        subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, check=True, timeout=300)
    assert not list((tmp_path / "my_videos").rglob("*.webp")) and len(list((tmp_path / "my_videos").rglob("*.mp4"))) == 64
    metrics = json.loads((tmp_path / "out" / "my_stage2" / "metrics.json").read_text())
    assert all(0 <= metrics[k] <= 1 for k in ("t2v_r1", "t2a_r1", "t2av_r1"))   # audio came from the mp4 files
    assert metrics["loss_last_atc"] < metrics["loss_first_atc"]                 # and the audio loss trained on it
    assert (tmp_path / "out" / "my_stage2" / "zeroshot_my_videos.json").exists()
    feats = np.load(tmp_path / "out" / "my_features.npz")
    assert feats["video"].shape[0] == feats["text"].shape[0] == len(feats["ids"]) == 16
    probe = json.loads((tmp_path / "out" / "my_probe.json").read_text())
    assert json.dumps(probe).count("top1") >= 2, probe
