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
