"""Harness (issue 21, audio+video words): stage 2 with `--pairs` of each batch's clips given a partner that shares
their picture attributes (shape, colour, size, direction, speed) and differs in its spoken words, so that the
audio+video losses meet words-only negatives. Toy-only experiment, not an option of train_stage2.py.

    python results/av_words_pairs.py --pairs=16 --out_dir=/tmp/exp_pairs [any train_stage2.py option]
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train_stage2  # noqa: E402

PICTURE = ("shape", "color", "size", "direction", "speed")


class PairSampler(data.StepSampler):
    """StepSampler's micro-batches with their last `pairs` clips replaced by a partner of each of the first `pairs`:
    another training clip with the same picture attributes (its words differ, or at worst repeat)."""
    groups, pairs = None, 16

    def __iter__(self):
        keep = self.micro - self.pairs
        for s, batch in enumerate(super().__iter__()):
            g = torch.Generator().manual_seed(self.seed * 7919 + self.start + s)
            out = batch[:keep]
            for i, e in batch[:self.pairs]:
                mates = [j for j in self.groups[i] if j != i] or [i]
                out.append((mates[int(torch.randint(len(mates), (1,), generator=g))], e))
            yield out


def main(argv):
    PairSampler.pairs = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--pairs=")), 16))
    argv = [a for a in argv if not a.startswith("--pairs=")]
    root = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("--data=")), data.TOYWORLD))
    if str(root) == data.TOYWORLD:                       # the stage script would write it; the pairs need it first
        data.make_toyworld(root)
    recs = [json.loads(line) for line in open(root / "train.jsonl")]
    by_picture = defaultdict(list)
    for i, r in enumerate(recs):
        by_picture[tuple(r["attrs"][a] for a in PICTURE)].append(i)
    PairSampler.groups = [by_picture[tuple(r["attrs"][a] for a in PICTURE)] for r in recs]
    data.StepSampler = PairSampler                       # train_loader builds its sampler from data's globals
    return train_stage2.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
