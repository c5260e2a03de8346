"""evaluate.py: held-out evaluation shared by the stage scripts, and runnable on its own.

  extract_features   run a feature function over a dataset, sharded over ranks, gathered in order
  linear_probe       multinomial logistic regression (L-BFGS) on frozen features, weight decay
                     picked on a split of the training features
  attentive_probe    a learned query cross-attends to frozen tokens, then a linear layer (V-JEPA's protocol)
  probe_labels       either probe on any labels (strings or ints): top-1 and per-class accuracy
  probe_attributes   probe_labels per ToyWorld attribute (shape, color, size, direction, speed)
  evaluate_stage1    those probes on frozen features of the student, a random-init student, each teacher
  evaluate_stage2    zero-shot retrieval text<->video/audio/audio+video, VTM re-ranking of the top k,
                     zero-shot classification with prompt templates (MM/dataset/ret_dataset.py:283-297)
  evaluate_stage3    held-out QA accuracy per question type and caption accuracy, by generation
  diagnose           per ToyWorld attribute, where the knowledge lives: teachers, students, stage-2 embeddings,
                     contrastive and matching heads, text tower, stage-3 tokens, queries and answers

Zero-shot evaluation of a stage-2 checkpoint on any folder with a val.jsonl (retrieval with and without matching
re-ranking; classification when every line has a `label`, or ToyWorld's `attrs`), printed and written to JSON:
    python evaluate.py --ckpt=out/stage2/ckpt.pt --data=data/toyworld            # or: evaluate.py zeroshot ...
Where each ToyWorld attribute lives along the three stages (a table, its JSON and a heat map):
    python evaluate.py diagnose --stage1=out/stage1/ckpt.pt --stage2=out/stage2/ckpt.pt --stage3=out/stage3/ckpt.pt
The frozen features of any stage-1/2/3 checkpoint (or released stage-2 file) on any JSONL, and probes on its labels:
    python evaluate.py features --ckpt=out/stage1/ckpt.pt --data=my_videos/val.jsonl --out=feats.npz
    python evaluate.py probe --ckpt=out/stage1/ckpt.pt --data=my_videos --label=label     # train.jsonl, val.jsonl
Each stage script also evaluates a checkpoint on its own with `--init_from=<ckpt> --max_steps=0`:
    python train_stage1.py --init_from=out/stage1/ckpt.pt --max_steps=0 --out_dir=out/stage1_eval
"""
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from common import ConfigError, cli, gather_objects, print0
from data import ATTRIBUTES, CAPTION_ATTRS, eval_loader, sample_file


@torch.no_grad()
def extract_features(fn, dataset, rt, batch_size=64, limit=None, workers=0, progress=""):
    """fn(batch) -> (B, D) features. Each rank reads its shard; returns (N, D) float32 on the CPU in
    dataset order (the first `limit` samples if given), identical on every rank. progress: a tqdm bar's
    label (rank 0 only); "" for none."""
    import sys
    from tqdm import tqdm
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(limit))
    feats, idxs = [], []
    batches = eval_loader(dataset, batch_size, rt.rank, rt.world, workers)
    for batch in tqdm(batches, desc=progress, disable=not (progress and rt.master), file=sys.stdout,
                      dynamic_ncols=True):
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


def linear_probe_predict(x_train, y_train, x_test, n_classes, wds=(1e-4, 1e-3, 1e-2, 1e-1)):
    """(N_test,) class predictions of a linear classifier on standardised frozen features (N, D). The weight decay
    is chosen on a 20% split of the training features, then the probe is refit on all of them."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    n_fit = int(0.8 * len(xtr))
    best = max(wds, key=lambda wd: _accuracy(*_fit_logreg(xtr[:n_fit], y_train[:n_fit], n_classes, wd),
                                             xtr[n_fit:], y_train[n_fit:]))
    w, b = _fit_logreg(xtr, y_train, n_classes, best)
    return (xte @ w + b).argmax(1)


def linear_probe(x_train, y_train, x_test, y_test, n_classes, wds=(1e-4, 1e-3, 1e-2, 1e-1)):
    """Held-out accuracy of linear_probe_predict."""
    return float((linear_probe_predict(x_train, y_train, x_test, n_classes, wds) == y_test).float().mean())


def _accuracy(w, b, x, y):
    return float(((x @ w + b).argmax(1) == y).float().mean())


class AttentiveProbe(torch.nn.Module):
    """A learned query cross-attends to frozen tokens (model.PoolCrossAttention), then LayerNorm and a linear
    classifier: (B, L, D) -> (B, classes). The query is a parameter, not the tokens' mean (as in the
    clip_projector), so it can ask for the same thing in every clip."""

    def __init__(self, dim, heads, n_classes):
        super().__init__()
        from model import PoolCrossAttention
        self.query = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm_kv = torch.nn.LayerNorm(dim)
        self.attn = PoolCrossAttention(dim, heads, dim)
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, n_classes))

    def forward(self, x):
        kv = self.norm_kv(x)
        return self.head(self.attn(self.query.expand(x.shape[0], -1, -1), kv, kv)[0][:, 0])


def attentive_probe_predict(x_train, y_train, x_test, n_classes, steps=300, batch=64, lr=3e-3, wd=0.05, heads=4,
                            seed=0):
    """(N_test,) class predictions of an attentive probe on frozen *tokens* (N, L, D), the protocol VideoMAE and
    V-JEPA use for frozen video encoders: AttentiveProbe trained with AdamW on mini-batches. Unlike the linear
    probe on a pooled vector it can find the object's tokens and compare them across frames."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = x_train.mean((0, 1)), x_train.std((0, 1)) + 1e-6              # standardise per channel
    xtr, xte = (x_train - mu) / sd, (x_test - mu) / sd
    probe = AttentiveProbe(xtr.shape[-1], heads, n_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(len(xtr), (min(batch, len(xtr)),), generator=g)
            loss = F.cross_entropy(probe(xtr[i]), y_train[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return torch.cat([probe(xte[j:j + 256]).argmax(1) for j in range(0, len(xte), 256)])


def attentive_probe(x_train, y_train, x_test, y_test, n_classes, steps=300, batch=64, lr=3e-3, wd=0.05, heads=4,
                    seed=0):
    """Held-out accuracy of attentive_probe_predict."""
    pred = attentive_probe_predict(x_train, y_train, x_test, n_classes, steps, batch, lr, wd, heads, seed)
    return float((pred == y_test).float().mean())


def label_indices(labels_train, labels_val, classes=None):
    """Labels (strings or ints) -> (classes, y_train, y_val): class indices into `classes`, by default the sorted
    set of the training labels. A held-out label that is not a class is a DataError naming it."""
    from data import DataError
    classes = list(classes or sorted(set(labels_train), key=lambda c: (isinstance(c, str), c)))
    index = {c: i for i, c in enumerate(classes)}
    for v in (*labels_train, *labels_val):
        if v not in index:
            raise DataError(f"label {v!r} is not among the training labels ({len(classes)}: "
                            f"{', '.join(map(repr, classes[:8]))}{', ...' if len(classes) > 8 else ''})")
    return classes, torch.tensor([index[v] for v in labels_train]), torch.tensor([index[v] for v in labels_val])


def probe_labels(f_train, labels_train, f_val, labels_val, predict=linear_probe_predict, classes=None):
    """Fit a probe on frozen features and their labels, score it on the held-out ones: {"top1", "per_class":
    {class: accuracy} for the classes the held-out set has, "chance": 1 / classes}. predict: linear_probe_predict
    (the default, on (N, D) vectors), attentive_probe_predict (on (N, L, D) tokens) or any fn(x_train, y_train,
    x_test, n_classes) -> predictions. classes: label_indices's (default: the sorted training labels)."""
    classes, y_train, y_val = label_indices(labels_train, labels_val, classes)
    hit = (predict(f_train, y_train, f_val, len(classes)) == y_val).float()
    return {"top1": float(hit.mean()), "chance": 1 / len(classes),
            "per_class": {str(c): float(hit[y_val == i].mean()) for i, c in enumerate(classes) if (y_val == i).any()}}


def probe_attributes(feat_train, records_train, feat_val, records_val, predict=None):
    """{attribute: held-out top-1} for every ToyWorld attribute the records carry: probe_labels with the attribute
    as the label and ToyWorld's own list of its values as the classes. predict: as probe_labels."""
    out = {}
    for attr, classes in ATTRIBUTES.items():
        if not all("attrs" in r and attr in r["attrs"] for r in records_train + records_val):
            continue
        labels = [[r["attrs"][attr] for r in recs] for recs in (records_train, records_val)]
        out[attr] = probe_labels(feat_train, labels[0], feat_val, labels[1], predict or linear_probe_predict,
                                 classes)["top1"]
    return out


def stage1_features(student, random_init, teachers, device):
    """{network: (pooled fn, tokens fn)}, each fn(batch of 2T-frame clips) -> features, for the four networks
    stage 1's probes compare. The student (and its random-init twin) and the image teacher read the T even
    frames, the video teacher all 2T. Pooled: the student's clip vector, the image teacher's frame-averaged
    pooled vector, the video teacher's mean token. Tokens: the student's (B, 1 + T*HW, D) last block, the image
    teacher's last returned block (frame-averaged CLS, every patch), the video teacher's (B, T*HW, D) tokens."""
    even = lambda b: b["video"].to(device)[:, :, ::2]
    whole = lambda b: b["video"].to(device)
    return {
        "student": (lambda b: student(even(b)), lambda b: student.forward_features(even(b))[0]),
        "random_init": (lambda b: random_init(even(b)), lambda b: random_init.forward_features(even(b))[0]),
        "teacher_clip": (lambda b: teachers.clip(even(b))["clip_final"], lambda b: teachers.clip(even(b))["clip"][-1]),
        "teacher_mae": (lambda b: teachers.mae.forward_features(whole(b)).mean(1),
                        lambda b: teachers.mae.forward_features(whole(b)))}


@torch.no_grad()
def evaluate_stage1(student, teachers, cfg, vcfg, rt):
    """Probes per ToyWorld attribute on frozen features of the held-out split (no official counterpart:
    ToyWorld's own protocol), for the trained student, a random-initialised student of the same preset,
    and each teacher: a linear probe on the pooled clip vector (`probe_*`) and one on the mean of the last block's
    tokens (`mean_probe_*`); for the two students also an attentive probe on those tokens (`attn_probe_*`,
    cfg.probe_steps AdamW steps; 0 skips it), which shows that position alone lets a random network's tokens give
    direction away. Needs records with `attrs` (ToyWorld); returns {} otherwise."""
    import time
    from data import VideoTextDataset
    from model import InternVideo2
    kw = dict(img_size=vcfg.img_size, train=False, seed=cfg.seed)
    sets = {s: VideoTextDataset(sample_file(cfg.data, s), 2 * cfg.num_frames, data_root=getattr(cfg, "data_root", "")
                                or None, **kw) for s in ("train", "val")}
    if not all("attrs" in r for r in sets["val"].records):
        print0("no `attrs` in the held-out samples: skipping the probes", rt=rt)
        return {}
    torch.manual_seed(cfg.seed)
    random_init = InternVideo2(vcfg).to(rt.device).eval()
    student.eval()
    feature_fns = stage1_features(student, random_init, teachers, rt.device)
    out, n_train = {}, min(cfg.probe_train_clips, len(sets["train"]))
    recs_train, recs_val = sets["train"].records[:n_train], sets["val"].records
    attentive = lambda *a: attentive_probe_predict(*a, steps=cfg.probe_steps)
    for name, (pooled_fn, tokens_fn) in feature_fns.items():
        t0 = time.time()
        pooled = [extract_features(pooled_fn, sets["train"], rt, limit=n_train), extract_features(pooled_fn, sets["val"], rt)]
        tokens = [extract_features(tokens_fn, sets["train"], rt, limit=n_train), extract_features(tokens_fn, sets["val"], rt)]
        kinds = {"probe": (pooled, linear_probe_predict),
                 "mean_probe": ([x.mean(1) for x in tokens], linear_probe_predict)}
        if cfg.probe_steps and name in ("student", "random_init"):
            kinds["attn_probe"] = (tokens, attentive)
        for kind, ((f_train, f_val), probe) in kinds.items():
            accs = probe_attributes(f_train, recs_train, f_val, recs_val, probe)
            out[f"{kind}_acc_{name}"] = sum(accs.values()) / len(accs)
            out.update({f"{kind}_{name}_{a}": v for a, v in accs.items()})
        print0(f"{name:<13} linear on pooled / mean token{' / attentive' if 'attn_probe' in kinds else ''}: " + " ".join(
            f"{a} " + "/".join(f"{out[f'{k}_{name}_{a}']:.2f}" for k in kinds) for a in accs)
            + f" | {time.time() - t0:.0f}s", rt=rt)
    chance = {a: 1 / len(c) for a, c in ATTRIBUTES.items() if f"probe_student_{a}" in out}
    out["probe_chance"] = sum(chance.values()) / len(chance)
    out.update({f"probe_chance_{a}": v for a, v in chance.items()})
    student.train()
    return out


# ------------------------------------------------------------------------------------------------
# stage 2: zero-shot retrieval with VTM re-ranking and classification (MM/tasks/retrieval_utils.py:197-206, 366-566)

def recall_at_k(sim, gt, ks=(1, 5, 10)):
    """sim, gt: (queries, gallery); gt True where the gallery item is a positive. A query counts at k
    when its best-ranked positive is in the top k (the official rule for several ground truths)."""
    order = sim.argsort(dim=1, descending=True)
    first_hit = gt.gather(1, order).float().argmax(1)            # rank of the best-ranked positive
    return {k: float((first_hit < k).float().mean()) for k in ks}


def retrieval(prefix, sim, gt):
    """{prefix_r1, _r5, _r10, _r1_chance} for text->X (rows of sim) and X->text (columns)."""
    a, b = prefix.split("2")
    out = {}
    for name, s, g in ((prefix, sim, gt), (f"{b}2{a}", sim.t(), gt.t())):
        out.update({f"{name}_r{k}": v for k, v in recall_at_k(s, g).items()})
        out[f"{name}_r1_chance"] = float(g.float().mean(1).mean())    # a random ranking: positives / gallery
    return out


@torch.no_grad()
def rerank(sim, k, score_fn, rt, chunk=128, pairs_fn=None):
    """Official VTM re-ranking (MM/tasks/retrieval_utils.py:366-566): for every query row keep its top-k gallery items
    by the dual-encoder score, score them with score_fn(query index, gallery indices) -> raw matching logits,
    and set every other item to -100. Rows are sharded over ranks and gathered. pairs_fn(query indices, gallery
    indices) -> logits, when given, scores the pairs of several rows at once (about 1024 a call) instead."""
    k = min(k, sim.shape[1])
    out = torch.full_like(sim, -100.0)
    rows = list(range(rt.rank, sim.shape[0], rt.world))
    local = {}
    group = max(1, 1024 // k) if pairs_fn else 1
    for g in range(0, len(rows), group):
        ids = torch.tensor(rows[g:g + group])
        tops = sim[ids].topk(k, dim=1).indices                           # (rows, k)
        if pairs_fn:
            scores = pairs_fn(ids.repeat_interleave(k), tops.flatten()).float().cpu().view(len(ids), k)
        else:
            scores = torch.cat([score_fn(int(ids[0]), tops[0, j:j + chunk]) for j in range(0, k, chunk)])[None]
        for i, top, score in zip(ids.tolist(), tops, scores.float().cpu()):
            local[i] = (top, score)
    for part in gather_objects(local, rt):
        for i, (top, score) in part.items():
            out[i, top] = score
    return out


def match_margins(scores, gt, records, caption_key):
    """ToyWorld's view into a re-ranking (MM/tasks/retrieval_utils.py:366-566 has none): for each attribute the caption
    type describes, mean matching logit of the positives minus that of the top-k candidates that differ from
    the query in that attribute alone. > 0: the matching head tells that attribute apart; about 0: it
    cannot, and re-ranking shuffles such candidates with the true clip. scores: re-ranked (queries,
    gallery) with -100 outside the top k; gt as for recall_at_k. {} without attributes."""
    attrs = CAPTION_ATTRS.get(caption_key, ())
    if not attrs or not all("attrs" in r for r in records):
        return {}
    scored = scores > -100
    differs = {}
    for a in attrs:
        names = [str(r["attrs"][a]) for r in records]
        v = torch.tensor([sorted(set(names)).index(x) for x in names])
        differs[a] = v[:, None] != v[None, :]
    n_diff = sum(d.int() for d in differs.values())
    pos = scores[gt & scored]
    out = {}
    for a in attrs:
        only = differs[a] & (n_diff == 1) & scored
        if only.any() and pos.numel():
            out[a] = float(pos.mean() - scores[only].mean())
    return out


def positives(records, caption_key):
    """(N, N) retrieval ground truth, True where text i and clip j are positives: the same positive id (the
    sample itself; on ToyWorld the same described attributes, as in training)."""
    from data import positive_id
    codes = torch.tensor([positive_id(r, caption_key) for r in records])
    return codes[:, None] == codes[None, :]


def toyworld_templates():
    """The prompts for zero-shot classification of ToyWorld's 8 motion classes: every caption template of
    ToyWorld with every appearance (4 shapes x 6 colours x 2 sizes x 3 templates = 144), the class ("left
    slowly") in the place of the motion words. This is the official prompt ensembling (each class in many
    templates, the scores averaged: MM/dataset/text_prompt.py:1-18, MM/models/criterions.py:42-50) with
    ToyWorld's own sentences as the templates: its text tower has seen no other sentences, as a real one has
    seen "a video of {}", and a class that names only the motion is the average over the appearances."""
    from data import ATTRIBUTES, VIDEO_TEMPLATES
    return tuple(t.replace("{direction} {speed}", "{{}}").format(shape=sh, color=c, size=si)
                 for t in VIDEO_TEMPLATES for sh in ATTRIBUTES["shape"] for c in ATTRIBUTES["color"]
                 for si in ATTRIBUTES["size"])


# zero-shot classification of ToyWorld's 8 motion classes: each class in every template, the cosines averaged
ZEROSHOT_TEMPLATES = toyworld_templates()
# and of the classes your held-out lines name in a `label` field (e.g. "label": "playing guitar")
LABEL_TEMPLATES = ("a video of {}.", "a video of a person {}.", "{}")


def motion_classes():
    from data import DIRECTIONS, SPEEDS
    return [f"{d} {s}" for d in DIRECTIONS for s in SPEEDS]


@torch.no_grad()
def zeroshot_scores(model, tok, v_emb, classes, templates, max_len, rt):
    """(videos, classes) zero-shot scores of a stage-2 model: the cosine between each clip embedding v_emb
    (N, E) and the text embedding of every "template.format(class)", averaged over the templates."""
    prompts = [t.format(c) for c in classes for t in templates]
    ids, mask = tok.encode(prompts, max_len)
    with rt.autocast():
        emb = model.encode_text(ids.to(rt.device), mask.to(rt.device))[1].float().cpu()
    emb = F.normalize(emb, dim=-1).view(len(classes), len(templates), -1)
    return torch.einsum("vd,ctd->vct", F.normalize(v_emb.float(), dim=-1), emb).mean(2)


@torch.no_grad()
def evaluate_stage2(model, tok, cfg, vcfg, acfg, rt):
    """Held-out zero-shot evaluation of a stage-2 model: unmasked 4-frame clips (middle frames),
    cosine retrieval text<->video, text<->audio, text<->audio+video, VTM re-ranking of the top k,
    and zero-shot classification of ToyWorld's motion classes with prompt templates averaged."""
    from data import VideoTextDataset, stage2_fields
    model.eval()
    keys = ["caption"] + (["audio_caption", "avs_caption"] if acfg else [])
    ds = VideoTextDataset(jsonl_file(cfg.data, "val"), cfg.num_frames, vcfg.img_size, train=False, seed=cfg.seed,
                          data_root=getattr(cfg, "data_root", "") or None,
                          extra=stage2_fields(tok, keys, cfg.max_text_len, acfg.frames if acfg else 0, False,
                                              cfg.resample_audio, getattr(cfg, "audio_from_video", False)))
    dev, local = rt.device, []
    for batch in eval_loader(ds, cfg.eval_batch, rt.rank, rt.world):
        with rt.autocast():
            v_mem, v_emb = model.encode_video(batch["video"].to(dev))
            row = {"idx": batch["idx"], "v_mem": v_mem.float().cpu(), "v_emb": v_emb.float().cpu()}
            for key in keys:
                ids, mask = batch[f"ids_{key}"].to(dev), batch[f"mask_{key}"].to(dev)
                states, emb = model.encode_text(ids, mask)
                row.update({f"states_{key}": states.float().cpu(), f"mask_{key}": mask.cpu(),
                            f"emb_{key}": emb.float().cpu()})
            if acfg:
                a_mem, a_emb = model.encode_audio(batch["fbank"].to(dev))
                row.update(a_mem=a_mem.float().cpu(), a_emb=a_emb.float().cpu(),
                           av_emb=model.fuse_av(a_emb, v_emb).float().cpu())
        local.append(row)
    rows = [r for part in gather_objects(local, rt) for r in part]
    order = torch.cat([r["idx"] for r in rows]).argsort()
    f = {k: torch.cat([r[k] for r in rows])[order] for k in rows[0] if k != "idx"}
    norm = lambda x: F.normalize(x, dim=-1)
    recs, out = ds.records, {}

    # text <-> video, then VTM re-ranking of the top k by the raw matching logit
    sim = norm(f["emb_caption"]) @ norm(f["v_emb"]).t()                        # (texts, videos)
    gt = positives(recs, "caption")
    out.update(retrieval("t2v", sim, gt))

    def reranked(name, sim, gt, key, memory, head):
        """VTM re-ranking both ways (MM/tasks/retrieval_utils.py:366-566): (text, gallery) pairs scored by the raw
        `head` logit over memory(gallery indices); recalls and, on ToyWorld, the head's per-attribute margins."""
        def score(ti, gi):
            with rt.autocast():
                logits = model.match_logits(f[f"states_{key}"][ti].to(dev), f[f"mask_{key}"][ti].to(dev),
                                            memory(gi).to(dev), head=head)
            return logits[:, 1]
        q2g = rerank(sim, cfg.rerank_k, None, rt, pairs_fn=score)
        g2q = rerank(sim.t(), cfg.rerank_k, None, rt, pairs_fn=lambda gi, ti: score(ti, gi))
        a, b = name.split("2")
        for n, s, g in ((name, q2g, gt), (f"{b}2{a}", g2q, gt.t())):
            out.update({f"{n}_r{k}_rerank": v for k, v in recall_at_k(s, g).items()})
        tag = "vtm" if head == "itm" else head
        out.update({f"{name}_{tag}_margin_{attr}": v for attr, v in match_margins(q2g, gt, recs, key).items()})

    reranked("t2v", sim, gt, "caption", lambda vi: f["v_mem"][vi], "itm")

    if acfg:                                                                    # text <-> audio, audio+video
        out.update(retrieval("t2a", norm(f["emb_audio_caption"]) @ norm(f["a_emb"]).t(), positives(recs, "audio_caption")))
        sim_av, gt_av = norm(f["emb_avs_caption"]) @ norm(f["av_emb"]).t(), positives(recs, "avs_caption")
        out.update(retrieval("t2av", sim_av, gt_av))

        # AVTM on the audio + projected-vision memory (MM/tasks/retrieval_utils.py:326-360)
        reranked("t2av", sim_av, gt_av, "avs_caption", lambda vi: torch.cat([f["a_mem"][vi], f["v_mem"][vi]], dim=1),
                 "avtm")

    if recs and all(isinstance(r.get("label"), str) for r in recs):             # your data's classes, named
        classes = sorted({r["label"] for r in recs})
        scores = zeroshot_scores(model, tok, f["v_emb"], classes, LABEL_TEMPLATES, cfg.max_text_len, rt)
        truth = torch.tensor([classes.index(r["label"]) for r in recs])
        out["zeroshot_label_acc"] = float((scores.argmax(1) == truth).float().mean())
        out["zeroshot_label_chance"] = 1 / len(classes)
    if all("attrs" in r for r in recs):                                         # zero-shot motion classes
        classes = motion_classes()
        scores = zeroshot_scores(model, tok, f["v_emb"], classes, ZEROSHOT_TEMPLATES, cfg.max_text_len, rt)
        truth = torch.tensor([classes.index(f"{r['attrs']['direction']} {r['attrs']['speed']}") for r in recs])
        out["zeroshot_cls_acc"] = float((scores.argmax(1) == truth).float().mean())
        out["zeroshot_cls_chance"] = 1 / len(classes)
    model.train()
    return out


# ------------------------------------------------------------------------------------------------
# stage 3: held-out QA and captioning by generation

def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


@torch.no_grad()
def answer_questions(model, video_tokens, questions, llm_tok, bert_tok, max_llm_len, max_text_len, video_at,
                     qformer_text_input=True, max_new_tokens=8, temperature=0.0, top_p=1.0):
    """One question per clip -> the model's answers (str), decoding with the KV cache. Prompts of
    different lengths are left-padded after their embeddings are built."""
    from data import build_chat
    from model import generate
    n_visual = model.qformer.cfg.num_query + model.qformer.cfg.extra_query
    rows = [build_chat(llm_tok, [(q, None)], n_visual, max_llm_len) for q in questions]
    ids, mask = torch.stack([r[0] for r in rows]), torch.stack([r[2] for r in rows])
    dev = video_tokens.device
    instr = tuple(x.to(dev) for x in bert_tok.encode(questions, max_text_len)) if qformer_text_input else (None, None)
    emb = model.chat_embeds(ids.to(dev), model.visual_embeds(video_tokens, *instr), video_at)
    lengths, L = mask.sum(1), int(mask.sum(1).max())
    shift = (L - lengths)[:, None]                                   # right-padded -> left-padded
    src = (torch.arange(L)[None] - shift).clamp_min(0)
    emb = emb[:, :L].gather(1, src[..., None].expand(-1, -1, emb.shape[-1]).to(dev))
    left_mask = (torch.arange(L)[None] >= shift).long().to(dev)
    out = generate(model.llm, emb, left_mask, max_new_tokens, llm_tok.eos_id, temperature, top_p)
    answers = []
    for row in out.tolist():
        row = row[:row.index(llm_tok.eos_id)] if llm_tok.eos_id in row else row
        answers.append(llm_tok.decode(row))
    return answers


@torch.no_grad()
def evaluate_stage3(model, llm_tok, bert_tok, cfg, vcfg, rt, video_at):
    """Greedy answers to every held-out question, exact match per question type (qa_acc_<type>), and a
    generated caption per clip scored per attribute: right when it names the true value and no other
    value of that attribute (caption_acc). Chance: 1 / classes for each."""
    from data import ATTRIBUTES, CAPTION_PROMPTS, VideoTextDataset
    model.eval()
    ds = VideoTextDataset(sample_file(cfg.data, "val"), vcfg.num_frames, vcfg.img_size, train=False, seed=cfg.seed,
                          data_root=getattr(cfg, "data_root", "") or None)
    kw = dict(llm_tok=llm_tok, bert_tok=bert_tok, max_llm_len=cfg.max_llm_len, max_text_len=cfg.max_text_len,
              video_at=video_at, qformer_text_input=cfg.qformer_text_input)
    local = []
    for batch in eval_loader(ds, cfg.eval_batch, rt.rank, rt.world):
        recs = [ds.records[i] for i in batch["idx"].tolist()]
        with rt.autocast():
            tokens = model.video_tokens(batch["video"].to(rt.device))
            captions = answer_questions(model, tokens, [CAPTION_PROMPTS[0]] * len(recs), max_new_tokens=20, **kw)
            qa_types = sorted({qa.get("type", "qa") for r in recs for qa in r.get("qa", [])})
            results = [{"caption": c, "qa": []} for c in captions]
            for t in qa_types:                                          # one question type at a time
                rows = [(i, qa) for i, r in enumerate(recs) for qa in r.get("qa", []) if qa.get("type", "qa") == t]
                if rows:
                    got = answer_questions(model, tokens[[i for i, _ in rows]], [qa["q"] for _, qa in rows],
                                           max_new_tokens=6, **kw)
                    for (i, qa), a in zip(rows, got):
                        results[i]["qa"].append((t, _words(a) == _words(qa["a"]), a))
        local += list(zip(batch["idx"].tolist(), results))
    rows = sorted((r for part in gather_objects(local, rt) for r in part), key=lambda r: r[0])
    out, per_type = {}, {}
    for _, res in rows:
        for t, ok, _ in res["qa"]:
            per_type.setdefault(t, []).append(ok)
    if per_type:
        out["qa_acc"] = sum(sum(v) for v in per_type.values()) / sum(len(v) for v in per_type.values())
        out.update({f"qa_acc_{t}": sum(v) / len(v) for t, v in per_type.items()})
        known = {t: 1 / len(ATTRIBUTES[t]) for t in per_type if t in ATTRIBUTES}
        if known:
            out["qa_chance"] = sum(known[t] * len(per_type[t]) for t in known) / sum(len(per_type[t]) for t in known)
            out.update({f"qa_chance_{t}": c for t, c in known.items()})
    recs = ds.records
    if all("attrs" in r for r in recs):
        scores = []
        for (i, res) in rows:
            words = set(_words(res["caption"]))
            for attr, values in ATTRIBUTES.items():
                truth = recs[i]["attrs"][attr]
                scores.append(truth in words and not any(v in words for v in values if v != truth))
        out["caption_acc"] = sum(scores) / len(scores)
        out["caption_chance"] = sum(1 / len(v) for v in ATTRIBUTES.values()) / len(ATTRIBUTES)
        out["caption_examples"] = [f"{recs[i]['caption']} -> {res['caption']}" for i, res in rows[:5]]
    model.train()
    return out


# ------------------------------------------------------------------------------------------------
# diagnosis: where each ToyWorld attribute lives along the three stages

DIAGNOSIS_COLUMNS = (*ATTRIBUTES, "words")            # words: the two spoken words (audio-visual rows only)


def one_changed(attrs, attr, rng):
    """ToyWorld attributes with `attr` set to another of its values, or for "words" one of the two spoken words
    replaced by another (drawn with rng)."""
    from data import WORDS
    if attr == "words":
        j, words = int(rng.integers(2)), list(attrs["words"])
        words[j] = str(rng.choice([w for w in WORDS if w != words[j]]))
        return {**attrs, "words": words}
    other = [v for v in ATTRIBUTES[attr] if v != attrs[attr]]
    return {**attrs, attr: other[int(rng.integers(len(other)))]}


@torch.no_grad()
def diagnose(data, rt, stage1=None, stage2=None, stage3=None, teachers=None, n_train=600, batch=64, seed=0,
             log=print):
    """Where each ToyWorld attribute lives, representation by representation, on the held-out split. Give any of the
    three stages' checkpoints (paths); each adds its rows. Returns {"rows": {row: {column: value}}, "measure": {row:
    what its values are}, "chance": {column: chance of a probe}}; diagnosis_table() writes it as Markdown.
      linear probes (linear_probe, fitted on n_train training clips) of the pooled vector and of the mean token of
        each teacher, a random-init student and the stage-1 student (8 frames); of the stage-1 student at stage 2's
        frame count (the hand-off, before any stage-2 step); of the stage-2 video and audio embeddings; of the stage-3
        video tokens (penultimate block + LayerNorm, what the Q-Former reads) and the Q-Former's query outputs;
      stage 2, pairwise accuracy: the clip's own caption scored above the same caption with one attribute changed,
        by the contrastive cosine and by the matching head's p(match), for video and (with audio) audio+video with
        the fused caption (its column `words`: one spoken word changed); the text tower's cosine between the two
        captions (1.0: it cannot tell them apart); zero-shot direction and speed (the 8 motion classes' argmax);
      stage 3: held-out QA accuracy per question type, and caption_acc (evaluate_stage3)."""
    import numpy as np
    from types import SimpleNamespace
    from checkpoints import TOYS
    from common import load_checkpoint
    from data import WORDS, VideoTextDataset, WordPieceTokenizer, stage2_fields, toyworld_captions
    from model import InternVideo2, Stage2Model, VisionConfig
    root, dev = Path(data), rt.device
    rows, measure, sets = {}, {}, {}
    lin = "linear probe"

    def dataset(split, frames, extra=None):
        key = (split, frames, extra is not None)
        if key not in sets:
            sets[key] = VideoTextDataset(root / f"{split}.jsonl", frames, 32, train=False, seed=seed, extra=extra)
        return sets[key]

    def show(name, what):
        measure[name] = what
        log(f"{name:<52} " + " ".join(f"{a} {v:.2f}" for a, v in rows[name].items() if v is not None))

    def probe(name, fn, frames, extra=None, words=False):
        """Linear probes per attribute (and, with words, of each spoken word) on fn(batch) -> (B, D)."""
        tr, va = dataset("train", frames, extra), dataset("val", frames, extra)
        n = min(n_train, len(tr))
        f_tr = extract_features(fn, tr, rt, batch_size=batch, limit=n)
        f_va = extract_features(fn, va, rt, batch_size=batch)
        rows[name] = probe_attributes(f_tr, tr.records[:n], f_va, va.records)
        if words:
            label = lambda recs, j: torch.tensor([WORDS.index(r["attrs"]["words"][j]) for r in recs])
            rows[name]["words"] = sum(linear_probe(f_tr, label(tr.records[:n], j), f_va, label(va.records, j),
                                                   len(WORDS)) for j in (0, 1)) / 2
        show(name, lin)

    even = lambda b: b["video"].to(dev)[:, :, ::2]
    mean_tok = lambda x: x.mean(1)
    if teachers is None:
        from teachers import build_teachers
        teachers = build_teachers("toy", "toy", str(TOYS / "toy_clip_teacher.pt"), str(TOYS / "toy_mae_teacher.pt"))
    teachers.to(dev)
    probe("image teacher: pooled", lambda b: teachers.clip(even(b))["clip_final"], 16)
    probe("image teacher: mean token", lambda b: mean_tok(teachers.clip(even(b))["clip"][-1]), 16)
    probe("video teacher: mean token", lambda b: mean_tok(teachers.mae.forward_features(b["video"].to(dev))), 16)

    ck2 = load_checkpoint(stage2) if stage2 else None
    if stage1:
        ck = load_checkpoint(stage1)
        vcfg = VisionConfig.from_saved(ck["model_config"])
        torch.manual_seed(seed)
        random_init = InternVideo2(vcfg).to(dev).eval()
        student = InternVideo2(vcfg, with_heads=True)
        student.load_state_dict(ck["model"])
        student.to(dev).eval()
        for name, net in (("random-init student", random_init), ("stage-1 student", student)):
            probe(f"{name}: pooled", lambda b, net=net: net(even(b)), 16)
            probe(f"{name}: mean token", lambda b, net=net: mean_tok(net.forward_features(even(b))[0]), 16)
        t2 = ck2["model_config"]["vision"]["num_frames"] if ck2 else 4
        if t2 != vcfg.num_frames:                     # the hand-off: the same weights, the table resized in time
            enc = InternVideo2(vcfg)
            enc.load_state_dict({k: v for k, v in ck["model"].items() if k in enc.state_dict()})
            enc.set_num_frames(t2)
            enc.to(dev).eval()
            probe(f"stage-1 student at {t2} frames: mean token",
                  lambda b: mean_tok(enc.forward_features(b["video"].to(dev))[0]), t2)

    if stage2:
        s2 = Stage2Model.from_config(ck2["model_config"])
        s2.load_state_dict(ck2["model"])
        s2.to(dev).eval()
        cfg, t2 = ck2["config"], s2.vision_encoder.cfg.num_frames
        tok = WordPieceTokenizer(cfg.get("vocab") or Path(cfg["data"]) / "vocab.txt")
        L = cfg["max_text_len"]
        probe("stage-2 video embedding", lambda b: s2.encode_video(b["video"].to(dev))[1], t2)
        audio = s2.has_audio and all(r.get("audio") for r in dataset("val", t2).records)
        extra = stage2_fields(tok, [], L, s2.audio_encoder.cfg.frames, False) if audio else None
        if audio:
            probe("stage-2 audio embedding", lambda b: s2.encode_audio(b["fbank"].to(dev))[1], t2, extra, words=True)
        va = dataset("val", t2, extra)
        attrs = [r["attrs"] for r in va.records]
        feats = []
        for b in eval_loader(va, batch):
            m, e = s2.encode_video(b["video"].to(dev))
            row = {"v_mem": m, "v_emb": e}
            if audio:
                am, ae = s2.encode_audio(b["fbank"].to(dev))
                row.update(av_mem=torch.cat([am, m], 1), av_emb=s2.fuse_av(ae, e))
            feats.append(row)
        f = {k: torch.cat([r[k] for r in feats]) for k in feats[0]}

        def scores(texts, emb, mem, head):
            """(cosine to the clip's embedding, matching p(match)) of one text per held-out clip."""
            ids, mask = (x.to(dev) for x in tok.encode(texts, L))
            states, t = s2.encode_text(ids, mask)
            cos = (F.normalize(t.float(), dim=-1) * F.normalize(emb.float(), dim=-1)).sum(-1)
            p = torch.cat([F.softmax(s2.match_logits(states[i:i + batch], mask[i:i + batch], mem[i:i + batch],
                                                     head).float(), -1)[:, 1] for i in range(0, len(texts), batch)])
            return cos, p, F.normalize(t.float(), dim=-1)

        pair = "pairwise: own caption above it with the attribute changed (chance 0.5)"
        for tag, key, emb, mem, head, cols in (
                ("video", "caption", "v_emb", "v_mem", "itm", ATTRIBUTES),
                ("audio+video", "avs_caption", "av_emb", "av_mem", "avtm", DIAGNOSIS_COLUMNS)):
            if emb not in f:
                continue
            rng = np.random.default_rng(seed)
            cos0, p0, t0 = scores([toyworld_captions(a)[key] for a in attrs], f[emb], f[mem], head)
            contrast, match, text = {}, {}, {}
            for attr in cols:
                cos, p, t = scores([toyworld_captions(one_changed(a, attr, rng))[key] for a in attrs], f[emb],
                                   f[mem], head)
                contrast[attr], match[attr] = float((cos0 > cos).float().mean()), float((p0 > p).float().mean())
                text[attr] = float((t0 * t).sum(-1).mean())
            rows[f"stage-2 {tag}: contrastive"], rows[f"stage-2 {tag}: matching head"] = contrast, match
            show(f"stage-2 {tag}: contrastive", pair)
            show(f"stage-2 {tag}: matching head", pair)
            if tag == "video":
                rows["stage-2 text tower: cosine of the two captions"] = text
                show("stage-2 text tower: cosine of the two captions", "cosine (1.0: cannot tell them apart)")
        classes = motion_classes()
        zs = zeroshot_scores(s2, tok, f["v_emb"], classes, ZEROSHOT_TEMPLATES, L, rt)
        pred = [classes[i].split() for i in zs.argmax(1).tolist()]
        rows["stage-2 zero-shot motion classes"] = {
            attr: float(np.mean([p[k] == a[attr] for p, a in zip(pred, attrs)]))
            for k, attr in enumerate(("direction", "speed"))}
        show("stage-2 zero-shot motion classes", "accuracy of the argmax class's direction / speed")

    if stage3:
        from checkpoints import stage3_model, stage3_tokenizers
        from data import video_index
        ck = load_checkpoint(stage3)
        model = stage3_model(ck, dev, stage3)
        bert_tok, llm_tok = stage3_tokenizers(ck, stage3)
        t3 = model.vision_encoder.cfg.num_frames
        probe(f"stage-3 video tokens ({t3} frames): mean", lambda b: mean_tok(model.video_tokens(b["video"].to(dev))),
              t3)
        probe("stage-3 Q-Former queries: mean", lambda b: mean_tok(model.qformer(
            model.video_tokens(b["video"].to(dev)), mode="query")[0]), t3)
        cfg = SimpleNamespace(**{**ck["config"], "data": str(root), "eval_batch": batch})
        qa = evaluate_stage3(model, llm_tok, bert_tok, cfg, model.vision_encoder.cfg, rt, video_index(llm_tok))
        rows["stage-3 answers"] = {a: qa[f"qa_acc_{a}"] for a in ATTRIBUTES if f"qa_acc_{a}" in qa}
        rows["stage-3 answers"]["caption"] = qa.get("caption_acc")
        show("stage-3 answers", "held-out QA accuracy per question type; caption_acc")
    chance = {a: 1 / len(v) for a, v in ATTRIBUTES.items()} | {"words": 1 / len(WORDS)}
    return {"rows": rows, "measure": measure, "chance": chance}


def diagnosis_table(d):
    """Markdown: one row per representation, one column per attribute, and what the row measures."""
    attrs = [c for c in (*DIAGNOSIS_COLUMNS, "caption") if any(c in row for row in d["rows"].values())]
    lines = ["| representation | " + " | ".join(attrs) + " | measure |", "|---|" + "---|" * (len(attrs) + 1)]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for name, row in d["rows"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(a)) for a in attrs) + f" | {d['measure'][name]} |")
    lines.append("| chance (probes, QA) | " + " | ".join(fmt(d["chance"].get(a)) for a in attrs) + " | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# features and probes: any checkpoint with an InternVideo2 encoder, on any JSONL and any label field

STAGE2_KINDS = ("stage-2 checkpoint", "released stage-2 file")
CKPT_HELP = ("a stage-1, 2 or 3 checkpoint of train_stage*.py, or a released InternVideo2 stage-1 module or stage-2 "
             "file")


def stage2_from_checkpoint(ck, path):
    """A loaded --ckpt -> (Stage2Model, its evaluation settings): train_stage2.py's checkpoint with its run's config,
    or a released InternVideo2 stage-2 file (checkpoints.load_official_stage2) with the official MSR-VTT zero-shot
    settings (MM/scripts/evaluation/stage2/zero_shot/1B/config_msrvtt.py:19-31, 114). Any other file: ConfigError."""
    from checkpoints import checkpoint_kind, load_official_stage2
    from model import Stage2Model
    kind = checkpoint_kind(ck)
    if kind == "released stage-2 file":
        model, _ = load_official_stage2(ck)
        return model, {"num_frames": model.vision_encoder.cfg.num_frames, "max_text_len": 40, "rerank_k": 128}
    if kind == "stage-2 checkpoint" and "model_config" in ck:
        model = Stage2Model.from_config(ck["model_config"])
        model.load_state_dict(ck["model"])
        return model, ck["config"]
    raise ConfigError(f"--ckpt={path} is a {kind}; --ckpt wants a stage-2 checkpoint (train_stage2.py, "
                      f"or a released InternVideo2 stage-2 file)")


def stage2_tokenizer(settings, vocab=""):
    """The BERT tokenizer of a stage-2 checkpoint: --vocab, else the one its run used (a released file has none)."""
    from data import WordPieceTokenizer
    if not (vocab or "data" in settings):
        raise ConfigError("an official checkpoint needs --vocab=<its BERT vocab.txt> (bert-large-uncased)")
    return WordPieceTokenizer(vocab or settings.get("vocab") or Path(settings["data"]) / "vocab.txt")


def frozen_video(ck, path, num_frames=0):
    """What `features` and `probe` read of a loaded --ckpt: (model in eval mode, pooled, tokens, settings), with
    pooled(video) -> (B, E) and tokens(video) -> (B, 1 + N, D), the last block's tokens; video (B, 3, T, H, W).
      stage 2 (ours, or a released file): the Stage2Model; pooled is encode_video's projected embedding, the vector
        that retrieval and zero-shot classification compare with the text's;
      stage 1 or 3 (ours): the encoder alone, through the stages' hand-off (checkpoints.load_video_encoder); pooled
        is its attention pool, the clip vector stage 1 distils and stage 2 starts from.
    num_frames: the encoder's position table resized in time to that many frames (0: the checkpoint's)."""
    from checkpoints import checkpoint_kind, load_video_encoder, released_state, vision_config_from_state
    from model import InternVideo2, VisionConfig
    kind = checkpoint_kind(ck)
    if kind in STAGE2_KINDS:
        model, settings = stage2_from_checkpoint(ck, path)
        pooled = lambda v: model.encode_video(v)[1]
    elif kind == "released stage-1 module" or (kind in ("stage-1 checkpoint", "stage-3 checkpoint")
                                                 and "model_config" in ck):
        if kind == "released stage-1 module":                    # the official pre-training module: shapes say
            vcfg, settings = vision_config_from_state(released_state(ck))[1], {}
        else:
            mc = ck["model_config"]                               # stage 3 nests the encoder's config, stage 1 not
            vcfg, settings = VisionConfig.from_saved(mc.get("vision", mc)), ck["config"]
        model = torch.nn.ModuleDict({"vision_encoder": InternVideo2(vcfg)})
        load_video_encoder(model, ck, path)
        pooled = model.vision_encoder
    else:
        raise ConfigError(f"--ckpt={path} is a {kind}; features and probes read a stage-1, 2 or 3 checkpoint of "
                          f"this repository or a released InternVideo2 stage-1 module or stage-2 file")
    enc = model.vision_encoder
    if num_frames:
        enc.set_num_frames(num_frames)
    return model.eval(), pooled, lambda v: enc.forward_features(v)[0], settings


def jsonl_file(data, split):
    """--data -> the sample file it names: a file as given, or <folder>/<split>.jsonl (or the official <split>.json)."""
    p = Path(data)
    if p.is_dir():
        if not sample_file(p, split).exists():
            raise ConfigError(f"--data={data}: no {split}.jsonl (or {split}.json) there")
        return sample_file(p, split)
    if not p.is_file():
        raise ConfigError(f"--data={data}: no such file or folder")
    return p


def data_tag(path):
    """A short name for output files: a folder's name, or <folder>_<stem> for a JSONL file."""
    p = Path(path).resolve()
    return p.name if p.is_dir() else f"{p.parent.name}_{p.stem}"


def seeded_split(n, val_fraction, seed):
    """(train indices, held-out indices) of n lines, each list sorted: a random val_fraction held out, drawn from
    `seed` alone, so the same file and seed give the same split anywhere; at least one line on each side."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val_fraction={val_fraction}: want a fraction between 0 and 1")
    if n < 2:
        raise ConfigError(f"a split needs at least 2 lines, the file has {n}")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def read_labels(records, field, jsonl):
    """The `field` of every record, each a string or an int (DataError naming the line otherwise)."""
    import json
    from data import DataError
    for r in records:
        v = r.get(field)
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            got = f"got {json.dumps(v)[:40]}" if field in r else "it has none"
            raise DataError(f"{jsonl}:{r['_line']}: the label field {field!r} must be a string or an int, {got}")
    return [r[field] for r in records]


def features_main(argv):
    """python evaluate.py features --ckpt=... --data=<folder or .jsonl> [--out=feats.npz]"""
    import argparse
    import numpy as np
    from common import cleanup, load_checkpoint, setup_runtime
    from data import VideoTextDataset, stage2_fields
    p = argparse.ArgumentParser(prog="evaluate.py features", description="The pooled video embedding of every line "
                                "of a JSONL and, for a stage-2 checkpoint, the text embedding of its caption, saved "
                                "with the lines' ids (the `id` field, else the line number) in an .npz: keys ids, "
                                "video and text. Clips are read as evaluation reads them (the middle frame of each "
                                "segment, the whole frame resized).")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--data", required=True, help="a .jsonl file, or a folder: its <split>.jsonl")
    p.add_argument("--data_root", default="", help="where an official JSON's media paths start (default: its folder)")
    p.add_argument("--split", default="val", help="which JSONL of a --data folder: train | val")
    p.add_argument("--out", default="", help=".npz file; default <ckpt dir>/features_<data>.npz")
    p.add_argument("--batch_size", type=int, default=64, help="clips per batch")
    p.add_argument("--num_frames", type=int, default=0, help="frames per clip; 0 = the checkpoint's")
    p.add_argument("--vocab", default="", help="BERT vocab.txt for the captions (stage 2); default: the checkpoint's")
    p.add_argument("--max_text_len", type=int, default=0, help="caption tokens; 0 = the checkpoint's (official: 40)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    path = jsonl_file(a.data, a.split)
    ck = load_checkpoint(a.ckpt)                                      # CheckpointError: one line (common.cli)
    model, pooled, _, settings = frozen_video(ck, a.ckpt, a.num_frames)
    vcfg = model.vision_encoder.cfg
    ds = VideoTextDataset(path, vcfg.num_frames, vcfg.img_size, train=False, cache=False, data_root=a.data_root or None)
    captions = hasattr(model, "encode_text") and all(isinstance(r.get("caption"), str) and r["caption"].strip()
                                                     for r in ds.records)
    if captions:                       # the caption's tokens join each item (a caption list: one line per caption)
        ds.extra = stage2_fields(stage2_tokenizer(settings, a.vocab), ["caption"],
                                 a.max_text_len or settings["max_text_len"], 0, train=False)
    rt = setup_runtime(a.device, "auto", 0)
    if hasattr(model, "encode_text") and not captions:
        print0(f"{path}: not every line has a caption: video embeddings only", rt=rt)
    dev = rt.device
    model.to(dev)

    def fn(b):                         # -> (B, E), or (B, E + E_text) with the caption: one pass reads both
        v = pooled(b["video"].to(dev))
        if not captions:
            return v
        return torch.cat([v, model.encode_text(b["ids_caption"].to(dev), b["mask_caption"].to(dev))[1]], dim=1)
    x = extract_features(fn, ds, rt, a.batch_size, progress=f"features of {path.name}")
    out = {"ids": np.array([str(r.get("id", r["_line"])) for r in ds.records])}
    if captions:
        e_text = model.text_proj.out_features
        out["video"], out["text"] = (t.numpy() for t in x.split([x.shape[1] - e_text, e_text], dim=1))
    else:
        out["video"] = x.numpy()
    if rt.master:
        dest = Path(a.out or Path(a.ckpt).parent / f"features_{data_tag(path)}.npz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.savez(dest, **out)
        print(f"{len(ds)} clips of {path}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()) + f" -> {dest}")
    cleanup(rt)
    return out


def probe_main(argv):
    """python evaluate.py probe --ckpt=... --train=train.jsonl --val=val.jsonl [--label=label] [--probe=both]"""
    import argparse
    from common import cleanup, load_checkpoint, setup_runtime
    from runs import write_json
    from data import DataError, VideoTextDataset
    p = argparse.ArgumentParser(prog="evaluate.py probe", description="Frozen-feature probes of a checkpoint on the "
                                "labels of any JSONL: a linear probe (logistic regression) on the pooled video vector "
                                "and an attentive probe (V-JEPA's protocol: a learned query cross-attends to the last "
                                "block's tokens, then a linear layer). Top-1 and per-class accuracy on the held-out "
                                "lines, printed and written to JSON.")
    p.add_argument("--ckpt", required=True, help=CKPT_HELP)
    p.add_argument("--train", default="", help="JSONL the probes are fitted on (with --val)")
    p.add_argument("--val", default="", help="JSONL the probes are scored on (with --train)")
    p.add_argument("--data", default="", help="instead of --train/--val: a folder with train.jsonl and val.jsonl, or "
                   "one .jsonl split by --val_fraction and --seed")
    p.add_argument("--data_root", default="", help="where an official JSON's media paths start (default: its folder)")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of one --data file held out")
    p.add_argument("--seed", type=int, default=0, help="the held-out lines of one --data file are drawn from it")
    p.add_argument("--label", default="label", help="the field holding each line's class (strings or ints; classes "
                   "in the sorted order of the training labels)")
    p.add_argument("--probe", default="both", choices=("linear", "attentive", "both"), help="which probes to fit "
                   "(attentive keeps every clip's last-block tokens in memory: clips x tokens x width floats)")
    p.add_argument("--probe_steps", type=int, default=300, help="AdamW steps of the attentive probe")
    p.add_argument("--batch_size", type=int, default=64, help="clips per feature batch")
    p.add_argument("--num_frames", type=int, default=0, help="frames per clip; 0 = the checkpoint's")
    p.add_argument("--out", default="", help="JSON file; default <ckpt dir>/probe_<label>_<data>.json")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if (a.train or a.val) and not (a.train and a.val and not a.data):
        raise ConfigError("give --train and --val together (two JSONL files), or --data alone")
    if not (a.train or a.data):
        raise ConfigError("give --train=<jsonl> --val=<jsonl>, or --data=<folder with train.jsonl and val.jsonl, "
                          "or one .jsonl to split by --val_fraction>")
    one = a.data and not Path(a.data).is_dir()                         # one file: a seeded split of its lines
    files = ({"train": Path(a.train), "val": Path(a.val)} if a.train else
             {"all": jsonl_file(a.data, "")} if one else {s: jsonl_file(a.data, s) for s in ("train", "val")})
    ck = load_checkpoint(a.ckpt)
    model, pooled, tokens, _ = frozen_video(ck, a.ckpt, a.num_frames)
    vcfg = model.vision_encoder.cfg
    make = lambda f: VideoTextDataset(f, vcfg.num_frames, vcfg.img_size, train=False, data_root=a.data_root or None)
    if one:
        ds = make(files["all"])
        split = dict(zip(("train", "val"), seeded_split(len(ds), a.val_fraction, a.seed)))
        sets = {s: torch.utils.data.Subset(ds, idx) for s, idx in split.items()}      # sorted: dataset order kept
        records = {s: [ds.records[i] for i in idx] for s, idx in split.items()}
    else:
        sets = {s: make(f) for s, f in files.items()}
        records = {s: d.records for s, d in sets.items()}
    source = {s: files.get(s, files.get("all")) for s in ("train", "val")}
    labels = {s: read_labels(records[s], a.label, source[s]) for s in ("train", "val")}
    try:                                                                # fail before any feature is computed
        classes = label_indices(labels["train"], labels["val"])[0]
    except DataError as e:
        raise DataError(f"{source['val']}: {e}") from None
    rt = setup_runtime(a.device, "auto", 0)
    model.to(rt.device)
    print0(f"{a.ckpt} on {len(records['train'])} training / {len(records['val'])} held-out clips "
           f"({'a seeded split of ' + str(files['all']) if one else source['val']}), {len(classes)} classes of "
           f"{a.label!r}, {vcfg.num_frames} frames", rt=rt)
    kinds = {"linear": (pooled, linear_probe_predict),                  # (B, E) vectors
             "attentive": (tokens, lambda *x: attentive_probe_predict(*x, steps=a.probe_steps))}   # (B, 1 + N, D)
    out = {"ckpt": str(a.ckpt), "train": str(source["train"]), "val": str(source["val"]), "label": a.label,
           "classes": [str(c) for c in classes], "n_train": len(records["train"]), "n_val": len(records["val"]),
           "chance": 1 / len(classes)}
    if one:
        out.update(val_fraction=a.val_fraction, seed=a.seed)
    for kind in (("linear", "attentive") if a.probe == "both" else (a.probe,)):
        fn, predict = kinds[kind]
        f = {s: extract_features(lambda b: fn(b["video"].to(rt.device)), sets[s], rt, a.batch_size,
                                 progress=f"{kind} probe: {s} features") for s in ("train", "val")}
        out[kind] = probe_labels(f["train"], labels["train"], f["val"], labels["val"], predict, classes)
    if rt.master:
        done = [k for k in ("linear", "attentive") if k in out]
        count = {str(c): sum(str(v) == str(c) for v in labels["val"]) for c in classes}
        print(f"{'class':<16} {'val':>5} " + " ".join(f"{k:>9}" for k in done))
        for c in out["classes"]:
            if count[c]:
                print(f"{c[:16]:<16} {count[c]:>5} " + " ".join(f"{out[k]['per_class'][c]:>9.3f}" for k in done))
        print(f"{'top-1':<16} {out['n_val']:>5} " + " ".join(f"{out[k]['top1']:>9.3f}" for k in done)
              + f"   (chance {out['chance']:.3f})")
        path = Path(a.out or Path(a.ckpt).parent / f"probe_{a.label}_{data_tag(source['val'])}.json")
        write_json(path, out)
        print(f"-> {path}")
    cleanup(rt)
    return out


# ------------------------------------------------------------------------------------------------
# the commands: diagnose; zero-shot evaluation of a stage-2 checkpoint on any folder with a val.jsonl

def diagnose_main(argv):
    """python evaluate.py diagnose --stage1=... --stage2=... --stage3=... [--data=data/toyworld] [--out=...]"""
    import argparse
    import json
    from common import cleanup, setup_runtime
    p = argparse.ArgumentParser(prog="evaluate.py diagnose", description="Where each ToyWorld attribute lives along "
                                "the three stages: linear probes of every representation, the stage-2 contrastive "
                                "model's and matching head's pairwise accuracy, the text tower, stage-3 answers.")
    p.add_argument("--data", default="data/toyworld", help="ToyWorld folder (its records carry `attrs`)")
    for k in (1, 2, 3):
        p.add_argument(f"--stage{k}", default="", help=f"a stage-{k} checkpoint of train_stage{k}.py")
    p.add_argument("--n_train", type=int, default=600, help="training clips each linear probe is fitted on")
    p.add_argument("--out", default="out/diagnosis.md", help="the table (Markdown); .json and .png beside it")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if not any((a.stage1, a.stage2, a.stage3)):
        raise ConfigError("give at least one of --stage1, --stage2, --stage3 (checkpoints to diagnose)")
    for k in (1, 2, 3):
        path = getattr(a, f"stage{k}")
        if path and not Path(path).is_file():
            raise ConfigError(f"--stage{k}={path}: no such file")
    if not (Path(a.data) / "val.jsonl").exists():
        raise ConfigError(f"--data={a.data}: no val.jsonl there")
    rt = setup_runtime(a.device, "auto", 0)
    d = diagnose(a.data, rt, a.stage1 or None, a.stage2 or None, a.stage3 or None, n_train=a.n_train)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(diagnosis_table(d) + "\n")
    out.with_suffix(".json").write_text(json.dumps(d, indent=1))
    from plots import diagnosis_figure, have_matplotlib, save
    pictures = [str(save(diagnosis_figure(d), out.with_suffix(".png")))] if have_matplotlib() else []
    print(diagnosis_table(d))
    print(f"-> {', '.join([str(out), str(out.with_suffix('.json'))] + pictures)}")
    cleanup(rt)
    return d


def main(argv=None):
    """python evaluate.py [zeroshot] --ckpt=out/stage2/ckpt.pt --data=<folder with val.jsonl> [--rerank_k=128]
    python evaluate.py diagnose --stage1=... --stage2=... --stage3=...
    python evaluate.py features --ckpt=... --data=<folder or .jsonl> [--out=feats.npz]
    python evaluate.py probe --ckpt=... --train=<jsonl> --val=<jsonl> [--label=label] [--probe=linear|attentive|both]"""
    import argparse
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"diagnose": diagnose_main, "features": features_main, "probe": probe_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv and argv[0] == "zeroshot":
        argv = argv[1:]
    from types import SimpleNamespace
    from common import cleanup, load_checkpoint, print0, setup_runtime
    from runs import write_json
    from data import load_jsonl
    p = argparse.ArgumentParser(prog="evaluate.py [zeroshot]", description="Zero-shot retrieval (cosine, then matching re-ranking of the top k) and "
                                "zero-shot classification of a stage-2 checkpoint on the val.jsonl of --data "
                                "(or the .jsonl it names).")
    p.add_argument("--ckpt", required=True, help="a stage-2 checkpoint: train_stage2.py's, or a released "
                   "InternVideo2 stage-2 (video-text) file")
    p.add_argument("--data", required=True, help="folder with val.jsonl, or a .jsonl file (the JSONL format of "
                   "data.py)")
    p.add_argument("--data_root", default="", help="where an official JSON's media paths start (default: its folder)")
    p.add_argument("--vocab", default="", help="BERT vocab.txt; default: the one the checkpoint was trained with")
    p.add_argument("--num_frames", type=int, default=0, help="frames per clip; 0 = the checkpoint's")
    p.add_argument("--rerank_k", type=int, default=0, help="candidates re-ranked by the matching head; 0 = the checkpoint's")
    p.add_argument("--max_text_len", type=int, default=0, help="caption tokens; 0 = the checkpoint's (official files: 40)")
    p.add_argument("--batch", type=int, default=64, help="clips per evaluation batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="", help="JSON file for the figures; default <ckpt dir>/zeroshot_<data folder>.json")
    a = p.parse_args(argv)
    ck = load_checkpoint(a.ckpt)                                      # CheckpointError: one line (common.cli)
    val = jsonl_file(a.data, "val")
    model, tc = stage2_from_checkpoint(ck, a.ckpt)                    # ours, or a released stage-2 file
    tok = stage2_tokenizer(tc, a.vocab)
    rt = setup_runtime(a.device, "auto", 0)
    cfg = SimpleNamespace(data=a.data, data_root=a.data_root, num_frames=a.num_frames or tc["num_frames"], seed=0,
                          eval_batch=a.batch,
                          max_text_len=a.max_text_len or tc["max_text_len"], rerank_k=a.rerank_k or tc["rerank_k"],
                          resample_audio=tc.get("resample_audio", False),
                          audio_from_video=tc.get("audio_from_video", False))
    model.vision_encoder.set_num_frames(cfg.num_frames)
    model.to(rt.device)
    records, _ = load_jsonl(val, data_root=a.data_root or None)
    audio_keys = ("audio", "audio_caption", "avs_caption")
    acfg = model.audio_encoder.cfg if model.has_audio else None
    if acfg and not all(k in r for r in records for k in audio_keys):
        print0(f"{val}: not every line has {', '.join(audio_keys)}: text <-> video only", rt=rt)
        acfg = None
    print0(f"{a.ckpt} on {val} ({len(records)} clips, {cfg.num_frames} frames, re-rank top {cfg.rerank_k})", rt=rt)
    out = {"ckpt": str(a.ckpt), "data": str(val), "clips": len(records), "num_frames": cfg.num_frames,
           "rerank_k": cfg.rerank_k, **evaluate_stage2(model, tok, cfg, model.vision_encoder.cfg, acfg, rt)}
    if rt.master:
        path = Path(a.out or Path(a.ckpt).parent / f"zeroshot_{data_tag(a.data)}.json")
        write_json(path, out)
        for name in ("t2v", "v2t", "t2a", "a2t", "t2av", "av2t"):
            if f"{name}_r1" in out:
                row = " ".join(f"R@{k} {out[f'{name}_r{k}']:.3f}" for k in (1, 5, 10))
                rr = (" | re-ranked " + " ".join(f"R@{k} {out[f'{name}_r{k}_rerank']:.3f}" for k in (1, 5, 10))
                      if f"{name}_r1_rerank" in out else "")
                print(f"{name:<5} {row}{rr}")
        for kind in ("label", "cls"):
            if f"zeroshot_{kind}_acc" in out:
                print(f"zero-shot classification ({'labels' if kind == 'label' else 'ToyWorld motion classes'}) "
                      f"{out[f'zeroshot_{kind}_acc']:.3f} (chance {out[f'zeroshot_{kind}_chance']:.3f})")
        print(f"-> {path}")
    cleanup(rt)
    return out


if __name__ == "__main__":
    cli(main)
