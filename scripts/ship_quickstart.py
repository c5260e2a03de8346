"""Copy the quick start's three trained models into toys/, where the notebooks read them.

The notebooks show the model the README's figures describe, the same on every machine: the weights of the quick
start (README's first line, seed 0) without their optimizer state, beside the toy teachers. The quick start rebuilds
them bit for bit on a machine of this kind (same tensors; `--check` compares without writing).

    python train_stage1.py && python train_stage2.py --init_from=out/stage1/ckpt.pt && \\
        python train_stage3.py --init_from=out/stage2/ckpt.pt
    python scripts/ship_quickstart.py             # out/stage{1,2,3}/ckpt.pt -> toys/quickstart_stage{1,2,3}.pt
    python scripts/ship_quickstart.py --check     # are the shipped ones what out/ holds?
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEEP = ("stage", "step", "model", "config", "model_config", "tokenizers")   # no optimizer, scaler, RNG


def shipped(k):
    return ROOT / "toys" / f"quickstart_stage{k}.pt"


def main(argv):
    from common import load_checkpoint
    check = "--check" in argv
    same = True
    for k in (1, 2, 3):
        src = ROOT / "out" / f"stage{k}" / "ckpt.pt"
        ck = load_checkpoint(src)
        slim = {key: ck[key] for key in KEEP if key in ck}
        if check:
            old = load_checkpoint(shipped(k))["model"]
            diff = [n for n in slim["model"] if n not in old or not torch.equal(old[n], slim["model"][n])]
            same &= not diff and set(old) == set(slim["model"])
            print(f"stage {k}: {'the same tensors' if not diff else f'{len(diff)} tensors differ, e.g. {diff[:3]}'}")
        else:
            torch.save(slim, shipped(k))
            print(f"{src} -> {shipped(k)} ({shipped(k).stat().st_size / 1e6:.1f} MB)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
