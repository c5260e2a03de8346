"""Pictures: the one place that draws. The stage scripts write theirs next to metrics.json; the notebooks
show the same figures inline.

    from plots import loss_figure, save
    save(loss_figure({"stage 1": result}), "out/stage1/loss.png")     # result: common.training_loop's

Every function returns a matplotlib Figure built without pyplot (no GUI backend, no global state), so a
script can save it and a notebook can display it. matplotlib is optional for training:
`save_pictures` prints one line and draws nothing when it is missing.
"""
import math
from pathlib import Path

import torch

from data import IMAGENET_MEAN, IMAGENET_STD


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _figure(w, h):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def save_pictures(out_dir, draw, rt=None):
    """draw() -> {file name: Figure or None}; saved under out_dir by rank 0 (None: skipped). Without matplotlib:
    one line, nothing else."""
    from common import print0
    if rt is not None and not rt.master:
        return []
    if not have_matplotlib():
        print0("matplotlib is not installed: no pictures (pip install matplotlib)")
        return []
    paths = [save(fig, Path(out_dir) / name) for name, fig in draw().items() if fig is not None]
    print0("pictures -> " + ", ".join(str(p) for p in paths))
    return paths


def to_image(video):
    """ImageNet-normalised (3, T, H, W) -> (T, H, W, 3) in [0, 1], for imshow."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None, None]
    return (video.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 3, 0).numpy()


# ------------------------------------------------------------------------------------------------
# training curves

def _smooth(values, k):
    out, acc = [], 0.0
    for i, v in enumerate(values):                       # running mean over the last k steps
        acc += v - (values[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def loss_figure(runs, smooth=10):
    """runs: {title: training_loop's result} (its `history`, the total per step, and `parts`, one {term: value}
    per step); one panel per run (None when no run has a step). Thin lines are the steps, thick ones a running mean over `smooth` steps."""
    runs = {k: r for k, r in runs.items() if r and r.get("history")}
    if not runs:
        return None                                           # nothing trained (e.g. --max_steps=0)
    fig = _figure(max(5.5, 4.2 * len(runs)), 3.2)
    for ax, (title, r) in zip(fig.subplots(1, max(1, len(runs)), squeeze=False)[0], runs.items()):
        parts = r.get("parts") or []
        curves = {"total": r["history"], **{k: [p[k] for p in parts] for k in (parts[0] if parts else {})}}
        if len(curves) == 2:                                  # one term: it is the total
            curves.pop(next(k for k in curves if k != "total"))
        steps = range(1, len(r["history"]) + 1)
        for i, (name, v) in enumerate(curves.items()):
            ax.plot(steps, v, lw=0.6, alpha=0.3, color=f"C{i}")
            ax.plot(steps, _smooth(v, smooth), lw=2, color=f"C{i}", label=name)
        ax.set(title=title, xlabel="step", ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------------
# clips and masks

def frames_figure(video, title=None, n=8, per_row=8, height=1.3):
    """One clip (3, T, H, W) as up to n evenly spaced frames, per_row to a row."""
    img = to_image(video)
    idx = torch.linspace(0, len(img) - 1, min(n, len(img))).round().long().tolist()
    rows, cols = math.ceil(len(idx) / per_row), min(per_row, len(idx))
    fig = _figure(height * cols, (height + 0.15) * rows + (0.3 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, t in zip(axes, idx):
        ax.imshow(img[t], interpolation="nearest")
        ax.set_title(f"frame {t}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _visible_grid(visible, grid):
    """visible (1 + n,) token index (0 = CLS) -> (T', h, w) bool, True where the student sees the patch."""
    T, h, w = grid
    keep = torch.zeros(T * h * w, dtype=torch.bool)
    keep[visible[visible > 0].long().cpu() - 1] = True
    return keep.view(T, h, w)


def mask_figure(video, masks, grid, attn=None, max_frames=8):
    """Rows of frames: the image teacher's attention over each frame (if attn (T', h*w) is given), then one
    row per {name: visible (1 + n,)} with the hidden patches greyed out: what the student sees."""
    rows = ([("teacher attention", attn)] if attn is not None else [])
    rows += [(name, _visible_grid(visible, grid)) for name, visible in masks.items()]
    return _frame_rows(video, rows, grid, max_frames)


def attention_figure(video, maps, grid, max_frames=8):
    """One row per {name: weights (T'*h*w,) over the clip's patches}: the weights drawn over each frame."""
    return _frame_rows(video, [(name, w.reshape(grid[0], -1)) for name, w in maps.items()], grid, max_frames)


def _frame_rows(video, rows, grid, max_frames):
    """rows: [(label, (T', h*w) float weights -> heat map over the frame | (T', h, w) bool -> grey the False patches)]."""
    img = to_image(video)
    T, h, w = grid
    cols = min(T, max_frames)
    fig = _figure(1.25 * cols + 1.2, 1.3 * len(rows))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    p = img.shape[1] // h
    for r, (name, x) in enumerate(rows):
        for c in range(cols):
            ax, frame = axes[r, c], img[c]
            if x.dtype == torch.bool:                                   # a mask: grey out the hidden patches
                m = x[c].repeat_interleave(p, 0).repeat_interleave(p, 1).numpy()[..., None]
                ax.imshow(frame * m + 0.5 * (1 - m), interpolation="nearest")
            else:                                                       # weights over the frame's patches
                ax.imshow(frame, interpolation="nearest")
                ax.imshow(x[c].float().cpu().view(h, w).numpy(), cmap="magma", alpha=0.6, interpolation="nearest",
                          extent=(-0.5, frame.shape[1] - 0.5, frame.shape[0] - 0.5, -0.5))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------
# matrices, bars, retrieval rows

def matrix_figure(m, rows=None, cols=None, title="", marks=None, cmap="viridis", size=6.0):
    """A heat map of m (R, C) with optional tick labels; marks: {name: [(r, c), ...]} drawn as symbols."""
    m = m.detach().float().cpu().numpy() if torch.is_tensor(m) else m
    R, C = m.shape
    label_room = 0.06 * max((len(s) for s in rows), default=0) if rows else 0
    fig = _figure(size + label_room, size * R / C + 0.6)
    ax = fig.subplots()
    im = ax.imshow(m, cmap=cmap, aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if rows is not None:
        ax.set_yticks(range(R), rows, fontsize=6)
    if cols is not None:
        ax.set_xticks(range(C), cols, fontsize=6, rotation=90)
    for i, (name, points) in enumerate((marks or {}).items()):     # white symbols: o, x, + in turn
        if points:
            r, c = zip(*points)
            ax.scatter(c, r, s=40, label=name, **[dict(marker="o", facecolors="none", edgecolors="white"),
                                                   dict(marker="x", color="white"), dict(marker="+", color="white")][i % 3])
    if marks:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    return fig


def probe_figure(table, chance=None, title="held-out probe accuracy"):
    """table: {network: {attribute: accuracy}}; one group of bars per attribute, one bar per network,
    chance as a dash."""
    nets = list(table)
    attrs = list(next(iter(table.values())))
    fig = _figure(1.6 * len(attrs) + 2, 3.2)
    ax = fig.subplots()
    width = 0.8 / len(nets)
    for i, net in enumerate(nets):
        xs = [a + (i - (len(nets) - 1) / 2) * width for a in range(len(attrs))]
        ax.bar(xs, [table[net].get(a, 0.0) for a in attrs], width, label=net, color=f"C{i}")
    if chance:
        for a, name in enumerate(attrs):
            ax.hlines(chance[name], a - 0.45, a + 0.45, colors="black", linestyles="dashed", lw=1,
                      label="chance" if a == 0 else None)
    ax.set_xticks(range(len(attrs)), attrs)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title=title)
    ax.legend(fontsize=7, ncol=len(nets) + 1, loc="lower center", bbox_to_anchor=(0.5, 1.08))
    return fig


def diagnosis_figure(d, title="where the knowledge lives (held-out ToyWorld)"):
    """evaluate.diagnose's accuracies as a heat map, one row per representation, one column per attribute, each
    cell written out (the text tower's cosines, where lower is better, stay in the table)."""
    import numpy as np
    rows = {k: v for k, v in d["rows"].items() if not d["measure"][k].startswith("cosine")}
    cols = [c for c in ("shape", "color", "size", "direction", "speed", "words", "caption")
            if any(c in row for row in rows.values())]
    names = list(rows)
    m = [[np.nan if row.get(c) is None else row[c] for c in cols] for row in rows.values()]
    m = np.array(m, dtype=float)
    fig = _figure(2.2 + 0.75 * len(cols) + 0.055 * max(len(n) for n in names), 0.8 + 0.28 * len(names))
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (r, c), v in np.ndenumerate(m):
        if not np.isnan(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=9)
    return fig


def rows_figure(rows, frame=None, height=1.1):
    """Retrieval at a glance: rows = [(label, [(video (3, T, H, W), caption, correct), ...]), ...]; each
    clip shows one frame (the middle by default) with a green frame when correct, red otherwise."""
    cols = max(len(r[1]) for r in rows)
    fig = _figure(height * cols + 2.6, (height + 0.35) * len(rows))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, items) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(items):
                ax.axis("off")
                continue
            video, caption, correct = items[c]
            img = to_image(video)
            ax.imshow(img[len(img) // 2 if frame is None else frame], interpolation="nearest")
            for s in ax.spines.values():
                s.set_color("tab:green" if correct else "tab:red")
                s.set_linewidth(3)
            ax.set_title(_wrap(caption, 18), fontsize=5)
        axes[r, 0].set_ylabel(_wrap(label, 22), fontsize=7, rotation=0, ha="right", va="center")
    return fig


def _wrap(text, width):
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


def tokens_figure(rows, title="", per_row=24, legend=None):
    """Token sequences as coloured boxes: rows = [(name, [token, ...], [colour, ...] or None), ...], each
    wrapped at per_row tokens; legend: {label: colour} drawn under the title."""
    from matplotlib.patches import Patch, Rectangle
    lines = []                                            # (name or "", tokens, colours) per drawn line
    for name, toks, colours in rows:
        colours = colours or ["whitesmoke"] * len(toks)
        for j in range(0, max(1, len(toks)), per_row):
            lines.append((name if j == 0 else "", toks[j:j + per_row], colours[j:j + per_row]))
    fig = _figure(0.52 * per_row + 1.4, 0.36 * len(lines) + 0.7)
    ax = fig.subplots()
    ax.set(xlim=(-2.6, per_row), ylim=(len(lines), 0))
    ax.axis("off")
    for r, (name, toks, colours) in enumerate(lines):
        ax.text(-0.2, r + 0.5, name, ha="right", va="center", fontsize=7, weight="bold")
        for c, (tok, colour) in enumerate(zip(toks, colours)):
            ax.add_patch(Rectangle((c + 0.03, r + 0.1), 0.94, 0.8, color=colour))
            ax.text(c + 0.5, r + 0.5, tok, ha="center", va="center", fontsize=5.5)
    if legend:
        ax.legend(handles=[Patch(color=c, label=k) for k, c in legend.items()], fontsize=7, ncol=len(legend),
                  loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_title(title, fontsize=9, pad=18 if legend else 6)
    return fig


def audio_figure(wave, fbank, sr=16000, title=""):
    """A waveform (S,) and its fbank (frames, mels) one above the other."""
    fig = _figure(8, 3.6)
    a, b = fig.subplots(2, 1)
    wave = wave.detach().float().cpu().numpy() if torch.is_tensor(wave) else wave
    a.plot([i / sr for i in range(len(wave))], wave, lw=0.4)
    a.set(xlabel="seconds", title=title or "waveform", xlim=(0, len(wave) / sr))
    fb = fbank.detach().float().cpu().numpy() if torch.is_tensor(fbank) else fbank
    b.imshow(fb.T, origin="lower", aspect="auto", cmap="magma")
    b.set(xlabel="frame (10 ms)", ylabel="mel bin", title="log-mel filter bank (the audio encoder's input)")
    return fig


# ------------------------------------------------------------------------------------------------
# the pictures the stage scripts write (and the notebooks show)

@torch.no_grad()
def stage1_masks(teachers, sample, ratio):
    """The three masking generators (model.make_mask) on one stage-1 sample (video (3, 2T, H, W), mask_noise
    (T', Np)) at the run's ratio -> ({name: visible (1 + n,)}, the image teacher's attention (T', Np))."""
    from model import MASK_TYPES, make_mask
    video, noise = sample["video"][None], sample["mask_noise"][None]
    p = next(teachers.clip.parameters())
    attn = teachers.clip(video[:, :, ::2].to(p.device, p.dtype))["attn"].float().cpu()    # (1, T', Np)
    return {f"{name} mask": make_mask(name, noise, ratio, attn)[0] for name in MASK_TYPES}, attn[0]


def stage1_mask_figure(teachers, sample, grid, ratio):
    masks, attn = stage1_masks(teachers, sample, ratio)
    return mask_figure(sample["video"][:, ::2], masks, grid, attn)


@torch.no_grad()
def similarity_matrix(model, batch, key="caption"):
    """Stage 2's contrastive view of a batch, unmasked: cosine (texts, videos) of the projected [CLS] and clip
    embeddings (losses.similarity; the loss divides it by the temperature)."""
    import torch.nn.functional as F
    from losses import similarity
    dev = next(model.parameters()).device
    _, v = model.encode_video(batch["video"].to(dev))
    _, t = model.encode_text(batch[f"ids_{key}"].to(dev), batch[f"mask_{key}"].to(dev))
    return similarity(F.normalize(t.float(), dim=-1), F.normalize(v.float(), dim=-1)).cpu()


def stage2_similarity_figure(model, dataset, n=16, key="caption"):
    """The first n clips of `dataset` (a stage-2 VideoTextDataset with ids_<key>): their (text, video) cosine
    matrix, rows labelled with the captions. A trained model shows a bright diagonal (and bright off-diagonal
    cells where two clips share every attribute the caption names)."""
    from data import collate
    was_training = model.training
    model.eval()
    batch = collate([dataset[i] for i in range(min(n, len(dataset)))])
    sim = similarity_matrix(model, batch, key)
    model.train(was_training)
    return matrix_figure(sim, rows=batch[key], cols=[str(i) for i in range(len(sim))],
                         title="text (rows) x video (columns) cosine similarity, held-out clips")
