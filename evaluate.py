"""evaluate.py: held-out evaluation shared by the stage scripts, and runnable on its own.

  extract_features   run a feature function over a dataset, sharded over ranks, gathered in order
  linear_probe       multinomial logistic regression (L-BFGS) on frozen features, weight decay
                     picked on a split of the training features
  probe_attributes   a probe per ToyWorld attribute (shape, color, size, direction, speed)

    python evaluate.py --stage=1 --ckpt=out/stage1/ckpt.pt     # probe a stage-1 student again
"""
import torch
import torch.nn.functional as F

from common import gather_objects
from data import ATTRIBUTES, eval_loader


@torch.no_grad()
def extract_features(fn, dataset, rt, batch_size=64, limit=None, workers=0):
    """fn(batch) -> (B, D) features. Each rank reads its shard; returns (N, D) float32 on the CPU in
    dataset order (the first `limit` samples if given), identical on every rank."""
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    feats, idxs = [], []
    for batch in eval_loader(dataset, batch_size, rt.rank, rt.world, workers):
        with rt.autocast():
            feats.append(fn(batch).float().cpu())
        idxs.append(batch["idx"])
    local = (torch.cat(feats), torch.cat(idxs)) if feats else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    parts = gather_objects(local, rt)
    x, i = torch.cat([p[0] for p in parts if len(p[1])]), torch.cat([p[1] for p in parts])
    return x[i.argsort()]


def _fit_logreg(x, y, n_classes, wd, steps=100):
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + wd * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(x_train, y_train, x_test, y_test, n_classes, wds=(1e-4, 1e-3, 1e-2, 1e-1)):
    """Accuracy of a linear classifier on standardised frozen features. The weight decay is chosen on
    a 20% split of the training features, then the probe is refit on all of them."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    n_fit = int(0.8 * len(xtr))
    best = max(wds, key=lambda wd: _accuracy(*_fit_logreg(xtr[:n_fit], y_train[:n_fit], n_classes, wd),
                                             xtr[n_fit:], y_train[n_fit:]))
    return _accuracy(*_fit_logreg(xtr, y_train, n_classes, best), xte, y_test)


def _accuracy(w, b, x, y):
    return float(((x @ w + b).argmax(1) == y).float().mean())


def attribute_labels(records, attr):
    classes = ATTRIBUTES[attr]
    return torch.tensor([classes.index(r["attrs"][attr]) for r in records])


def probe_attributes(feat_train, records_train, feat_val, records_val):
    """{attribute: held-out accuracy} for every ToyWorld attribute the records carry."""
    out = {}
    for attr, classes in ATTRIBUTES.items():
        if not all("attrs" in r and attr in r["attrs"] for r in records_train + records_val):
            continue
        out[attr] = linear_probe(feat_train, attribute_labels(records_train, attr), feat_val,
                                 attribute_labels(records_val, attr), len(classes))
    return out


if __name__ == "__main__":
    import sys
    from pathlib import Path
    from common import load_checkpoint
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    if args.get("stage") != "1" or "ckpt" not in args:
        raise SystemExit("usage: python evaluate.py --stage=1 --ckpt=PATH [stage-1 options, e.g. --data=...]")
    import train_stage1
    trained = load_checkpoint(args["ckpt"])["config"]
    keep = ("data", "preset", "num_frames", "img_size", "clip_teacher", "mae_teacher", "clip_teacher_ckpt",
            "mae_teacher_ckpt", "seed")
    argv = [f"--{k}={trained[k]}" for k in keep if k not in args]
    argv += [a for a in sys.argv[1:] if not a.startswith(("--stage=", "--ckpt="))]
    argv += [f"--init_from={args['ckpt']}", "--max_steps=0", f"--out_dir={Path(args['ckpt']).parent / 'eval'}"]
    train_stage1.main(argv)
