"""pretrain_toys.py: toy stand-ins for the pre-trained networks the official recipe starts from.

Stage 1 distils two frozen teachers, InternViT-6B and VideoMAEv2-g (SM/scripts/pretraining/1B_pt.sh:19-67); stage 2
starts its text encoder from bert-large-uncased (MM/configs/model.py:12-18) and stage 3 its Q-Former from
bert-base-uncased (VC2/models/blip2/blip2.py:53) and its LLM from Mistral-7B
(VC2/scripts/videochat_mistral/config_7b_stage3.py:38). Random networks in their place teach a student nothing and
make matching and the frozen LLM of stage 3 unlearnable at toy scale, so ToyWorld gets small pre-trained ones, trained
on its training split and saved in the official (teachers) and Hugging Face (BERT, LLM) layouts, to be loaded through
the very functions that load the real checkpoints (teachers.load_teacher, checkpoints.load_bert, load_llm):

  pretrain_toy_teachers   the image teacher as a small CLIP (frame-caption contrastive), the video teacher on
                          ToyWorld's 8 motion classes (about 8 minutes on 2 CPU cores)
  pretrain_toy_bert       masked LM on ToyWorld's texts (15 s)
  pretrain_toy_llm        next token on ToyWorld's texts in the chat format, reading its video slots (3 minutes)

The four checkpoints are shipped in toys/, as the real ones are downloaded; the stage scripts call these only when
they are missing. This rebuilds all four from ToyWorld (seed 0), bit for bit on the same machine and thread count:

    python pretrain_toys.py --data=data/toyworld --out=toys      # about 15 minutes on 2 CPU cores
"""
import math
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import bert_key_map, llm_key_map
from common import fit, print0
from data import ATTRIBUTES, CAPTION_PROMPTS, TEXT_KEYS, VideoTextDataset, build_chat, load_jsonl, train_loader
from losses import answer_loss, contrastive_loss, mask_tokens, token_cross_entropy
from model import LLM, TextEncoder, count_params
from teachers import CLIP_TEACHER_PRESETS, MAE_TEACHER_PRESETS, InternViTTeacher, VideoMAETeacher


# ------------------------------------------------------------------------------------------------
# the two teachers of stage 1 (the real ones come pre-trained; ToyWorld's must learn something first)

class BagOfWords(nn.Module):
    """The toy CLIP's text tower: hashed words -> mean embedding -> MLP. Captions are templated, so
    word identity is all the signal there is."""

    def __init__(self, dim, buckets=2048):
        super().__init__()
        self.buckets = buckets
        self.emb = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, texts):
        ids = [torch.tensor([zlib.crc32(w.encode()) % self.buckets for w in t.lower().replace(",", " ").split()])
               for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        dev = self.emb.weight.device
        return self.mlp(self.emb(torch.cat(ids).to(dev), offsets.to(dev)))


def pretrain_toy_teachers(data_root, out_dir, clip_steps=2000, motion_steps=400, batch=64, lr=2e-3, seed=0, log=print,
                          history=None, verbose=True, clip_mean_weight=1.0):
    """Train the toy image teacher (CLIP) and video teacher (ToyWorld's motion classes) on ToyWorld's train split and
    save them in the official layouts. Returns the two checkpoint paths; the loss curves go to history['clip'] and
    ['motion'] when a dict is given.
    clip_mean_weight: weight of a second CLIP term on the image teacher's mean patch token (through its own
    projection, not saved): the student distils the teacher's tokens, and with the pooled vector alone they
    carry shape only where the pooling looks (a linear probe on their mean reads shape 0.80; with the term 0.97).
    The video teacher learns motion as a classifier: the official one knows motion from masked pixel reconstruction
    at scale (90% tube masking), and 100-400 toy steps of that taught the toy network none
    (results/toyworld_levers.md)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history = {} if history is None else history
    torch.manual_seed(seed)
    clip_cfg, mae_cfg = CLIP_TEACHER_PRESETS["toy"], MAE_TEACHER_PRESETS["toy"]
    jsonl = Path(data_root) / "train.jsonl"

    # image teacher: one random frame per clip against its caption (CLIP, learnable temperature);
    # clips with the same caption are positives of each other
    clip, text = InternViTTeacher(clip_cfg), BagOfWords(clip_cfg.pool_dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    with torch.random.fork_rng():                       # the video teacher's init draws what it drew without it
        mean_proj = nn.Linear(clip_cfg.dim, clip_cfg.pool_dim)
    ds = VideoTextDataset(jsonl, 1, clip_cfg.img_size, train=True, seed=seed, crop_scale=(0.6, 1.0))

    def clip_loss(b):
        x = clip.tokens(b["video"][:, :, :1])[0]                                # (B, 1 + HW, D)
        txt = F.normalize(text(b["caption"]), dim=-1)
        ids = torch.tensor([zlib.crc32(c.encode()) for c in b["caption"]])
        temp = 1 / logit_scale.exp().clamp(max=100)
        loss = contrastive_loss(F.normalize(clip.clip_projector(x), dim=-1), txt, temp, ids)
        if clip_mean_weight:
            mean = F.normalize(mean_proj(x[:, 1:].mean(1)), dim=-1)
            loss = loss + clip_mean_weight * contrastive_loss(mean, txt, temp, ids)
        return loss
    params = [p for p in clip.parameters() if p.requires_grad] + list(text.parameters()) + [logit_scale]
    params += list(mean_proj.parameters()) if clip_mean_weight else []
    loader = iter(train_loader(ds, batch, 0, 1, seed, 0, workers=1))
    fit("toy image teacher (CLIP)", params, lambda s: clip_loss(next(loader)), clip_steps, lr, 0.05, (0.9, 0.98),
        history.setdefault("clip", []), verbose)
    clip_path = out_dir / "toy_clip_teacher.pt"
    torch.save({"module": clip.state_dict(), "config": asdict(clip_cfg)}, clip_path)

    # video teacher: ToyWorld's 8 motion classes, direction x speed, from the mean token (VideoMAE's fine-tuning
    # head), on uncropped clips: a crop would change the apparent speed
    mae = VideoMAETeacher(mae_cfg)
    # what the masked-pixel decoder once built here drew (that objective is gone, see above): the head below starts
    # where the shipped toys/toy_mae_teacher.pt's did, so that file is rebuilt bit for bit
    torch.rand(130240)
    directions, speeds = ATTRIBUTES["direction"], ATTRIBUTES["speed"]
    head = nn.Linear(mae_cfg.dim, len(directions) * len(speeds))
    ds = VideoTextDataset(jsonl, mae_cfg.num_frames, mae_cfg.img_size, train=True, seed=seed + 1, crop_scale=(1.0, 1.0),
                          extra=lambda rec, rng: {"attrs": rec["attrs"]})

    def motion_loss(b):
        y = torch.tensor([directions.index(a["direction"]) * len(speeds) + speeds.index(a["speed"]) for a in b["attrs"]])
        return F.cross_entropy(head(mae.forward_features(b["video"]).mean(1)), y)
    if motion_steps:
        loader = iter(train_loader(ds, batch, 0, 1, seed + 2, 0, workers=1))
        fit("toy video teacher (motion classes)", list(mae.parameters()) + list(head.parameters()),
            lambda s: motion_loss(next(loader)), motion_steps, lr / 2, 0.05, (0.9, 0.999),
            history.setdefault("motion", []), verbose)
    mae_path = out_dir / "toy_mae_teacher.pt"
    torch.save({"model": {"encoder." + k: v for k, v in mae.state_dict().items()}, "config": asdict(mae_cfg)},
               mae_path)
    curve = lambda k: f"{history[k][0]:.3f} -> {history[k][-1]:.3f}" if history.get(k) else "skipped"
    log(f"toy teachers saved: {clip_path} ({count_params(clip) / 1e6:.2f}M, CLIP loss {curve('clip')}), {mae_path} "
        f"({count_params(mae) / 1e6:.2f}M, motion loss {curve('motion')})")
    return clip_path, mae_path


# ------------------------------------------------------------------------------------------------
# the text networks of stages 2 and 3

def _texts(data_root):
    recs, _ = load_jsonl(Path(data_root) / "train.jsonl")
    texts = [r[k] for r in recs for k in TEXT_KEYS if r.get(k)]
    return recs, texts + [f"{qa['q']} {qa['a']}" for r in recs for qa in r.get("qa", [])]


def pretrain_toy_bert(data_root, tok, tcfg, path, steps=150, batch=64, lr=1e-3, max_len=24, seed=0):
    """The stand-in for bert-*-uncased: masked LM (15%, 80/10/10) on ToyWorld's training texts, every
    layer text-only as in BERT's own pre-training. About 15 s on 2 CPU cores."""
    _, texts = _texts(data_root)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = TextEncoder(tcfg)

    def loss_at(step):
        ids, mask = tok.encode([texts[i] for i in torch.randint(len(texts), (batch,), generator=g)], max_len)
        corrupted, labels = mask_tokens(ids, mask, len(tok), tok.mask_id, tok.cls_id, prob=0.15)
        h = enc.forward_fusion(enc.forward_text(corrupted, mask), mask, memory=None)
        return token_cross_entropy(enc.mlm_logits(h), labels)
    loss = fit("toy BERT (masked LM on ToyWorld text)", enc.parameters(), loss_at, steps, lr)
    key_map = bert_key_map(enc.cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key_map[k]: v for k, v in enc.state_dict().items() if ".cross" not in k}, path)
    print0(f"toy BERT saved to {path} (masked-LM loss {loss:.3f} after {steps} steps)")
    return path


def pretrain_toy_llm(data_root, tok, lcfg, path, n_visual=16, steps=1000, batch=64, lr=2e-3, max_len=48, seed=0):
    """The stand-in for Mistral-7B: next-token training on ToyWorld's texts in the chat format, where the n_visual
    video slots hold the words for what the clip shows (its five attribute values) in random order at random slots.
    A real LLM reads whatever its context says; this teaches the toy one to read its video slots, so that stage 3's
    bridge has something to write to (sub-stage 2 keeps the LLM frozen). Two earlier versions failed there
    (results/toyworld_motion.md): the caption itself in the slots, 250 steps, left the LLM unable to answer direction
    even from the true caption; 1000 steps taught it to copy the caption's sentence, template and word order
    included, which a bridge cannot write from a video. About 3 minutes on 2 CPU cores."""
    recs, _ = _texts(data_root)
    convs = [(r, qa["q"], qa["a"]) for r in recs for qa in r.get("qa", []) if r.get("attrs")]
    convs += [(r, p, r["caption"]) for r in recs if r.get("attrs") and r.get("caption") for p in CAPTION_PROMPTS]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    llm = LLM(lcfg)

    def loss_at(step):
        rows = []
        for i in torch.randint(len(convs), (batch,), generator=g).tolist():
            rec, q, a = convs[i]
            ids, labels, mask, at = build_chat(tok, [(q, a)], n_visual, max_len)
            words = [w for k in ATTRIBUTES for w in tok.encode(rec["attrs"][k])]       # what the clip shows
            words = [words[j] for j in torch.randperm(len(words), generator=g).tolist()]
            ids[at + torch.randperm(n_visual, generator=g)[:len(words)]] = torch.tensor(words)
            rows.append((ids, labels, mask))
        ids, labels, mask = (torch.stack([r[k] for r in rows]) for k in range(3))
        L = int(mask.sum(1).max())                             # drop the padding common to the batch
        ids, labels, mask = ids[:, :L], labels[:, :L], mask[:, :L]
        logits, _ = llm(llm.embed_tokens(ids), mask)
        return answer_loss(logits, labels)
    loss = fit("toy LLM (next token on ToyWorld text)", llm.parameters(), loss_at, steps, lr)
    key_map = llm_key_map(llm)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key_map[k]: v for k, v in llm.state_dict().items()}, path)
    print0(f"toy LLM saved to {path} (answer loss {loss:.3f} after {steps} steps)")
    return path


if __name__ == "__main__":
    from dataclasses import replace
    from data import ToyLLMTokenizer, WordPieceTokenizer, make_toyworld
    from model import LLM_PRESETS, QFORMER_PRESETS, text_preset
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    data, out = args.get("data", "data/toyworld"), Path(args.get("out", "toys"))
    torch.set_num_threads(int(args.get("threads", 2)))   # the shipped files were made with 2 threads
    make_toyworld(data)
    pretrain_toy_teachers(data, out)
    bert_tok = WordPieceTokenizer(Path(data) / "vocab.txt")
    pretrain_toy_bert(data, bert_tok, text_preset("toy", vocab_size=len(bert_tok)), out / "toy_bert.pt")
    llm_tok = ToyLLMTokenizer(Path(data) / "vocab.txt")
    pretrain_toy_llm(data, llm_tok, replace(LLM_PRESETS["toy"], vocab_size=len(llm_tok)), out / "toy_llm.pt",
                     n_visual=QFORMER_PRESETS["toy"].num_query + QFORMER_PRESETS["toy"].extra_query)
