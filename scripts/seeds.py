"""scripts/seeds.py: the quick start for several seeds (each with its own ToyWorld), and the headline
figures' mean and spread. Seed 0 is README's first command with its defaults spelled out (--seed=0,
--data=data/toyworld, out/stage{1,2,3});
seed s > 0 writes ToyWorld with seed s to data/toyworld_seed{s} and runs into out/seed{s}/.

    python scripts/seeds.py --seeds=0,1,2          # about 17 minutes a seed on 2 CPU cores
    python scripts/seeds.py --seeds=0,1,2 --skip_runs=True    # only summarise the metrics already there
    python scripts/seeds.py --seeds=0,1,2 --skip_runs=True --seconds0=330,240,210   # ... seed 0 timed by hand

Writes results/seeds.json: per seed the headline metrics and the wall time of each stage, then mean and
spread (max - min) over the seeds.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTRS = ("shape", "color", "size", "direction", "speed")
HEADLINE = {"stage1": [f"{kind}_student_{a}" for kind in ("probe", "mean_probe") for a in ATTRS]
                      + ["probe_acc_student", "mean_probe_acc_student", "probe_acc_random_init"],
            "stage2": ["t2v_r1", "t2v_r1_rerank", "v2t_r1", "v2t_r1_rerank", "t2av_r1", "t2av_r1_rerank", "t2a_r1",
                       "zeroshot_cls_acc"],
            "stage3": ["qa_acc", "qa_acc_color", "qa_acc_size", "qa_acc_shape", "qa_acc_direction", "qa_acc_speed",
                       "caption_acc"]}


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable] + cmd, cwd=ROOT, check=True)
    return round(time.time() - t0, 1)


def main():
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    seeds = [int(s) for s in args.get("seeds", "0,1,2").split(",")]
    saved = ROOT / "results" / "seeds.json"
    previous = json.loads(saved.read_text())["seeds"] if saved.exists() else {}
    per_seed = {}
    for s in seeds:
        data = "data/toyworld" if s == 0 else f"data/toyworld_seed{s}"
        out = "out" if s == 0 else f"out/seed{s}"
        common = [f"--seed={s}", f"--data={data}", "--overwrite"]      # a re-run replaces that seed's run
        times = {}
        if args.get("skip_runs") != "True":
            if s:
                run(["data.py", f"--out={data}", f"--seed={s}"])
            times["stage1"] = run(["train_stage1.py", *common, f"--out_dir={out}/stage1"])
            times["stage2"] = run(["train_stage2.py", *common, f"--init_from={out}/stage1/ckpt.pt", f"--out_dir={out}/stage2"])
            times["stage3"] = run(["train_stage3.py", *common, f"--init_from={out}/stage2/ckpt.pt", f"--out_dir={out}/stage3"])
        if not times and s == 0 and args.get("seconds0"):             # seed 0 run by hand (the quick start)
            times = dict(zip(("stage1", "stage2", "stage3"), map(float, args["seconds0"].split(","))))
        row = {"seconds": times or previous.get(str(s), {}).get("seconds", {})}   # a summary-only call keeps the times
        for stage, keys in HEADLINE.items():
            m = json.loads((ROOT / out / stage / "metrics.json").read_text())
            row.update({k: m[k] for k in keys if k in m})
        per_seed[s] = row
        print(json.dumps({s: row}), flush=True)
    keys = [k for k in per_seed[seeds[0]] if k != "seconds"]
    summary = {k: {"mean": round(sum(r[k] for r in per_seed.values()) / len(seeds), 4),
                   "spread": round(max(r[k] for r in per_seed.values()) - min(r[k] for r in per_seed.values()), 4)}
               for k in keys if all(isinstance(r.get(k), (int, float)) for r in per_seed.values())}
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(json.dumps({"seeds": per_seed, "summary": summary}, indent=1))
    for k, v in summary.items():
        print(f"{k:<36} {v['mean']:.3f} +- {v['spread'] / 2:.3f} (spread {v['spread']:.3f})")


if __name__ == "__main__":
    main()
