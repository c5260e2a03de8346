"""losses.py: each stage's objective and every loss term, as plain functions that work with or
without torch.distributed initialised.

  stage1/2/3_objective         networks, batch, settings -> (loss, {term: value}): one step's loss
  distill_loss / stage1_loss   stage 1: 2 - 2cos between L2-normalised student and teacher features
  all_gather_with_grad         the one cross-rank gather: exact gradients (see its docstring)
  contrastive_loss             symmetric InfoNCE with multi-positive targets from sample ids, every
                               rank seeing every negative (toy CLIP teacher, VTC/ATC/AVTC, Q-Former)
  matching_loss                matching with one hard negative per row from the local batch (VTM, AVTM)
  mlm_loss / captioning_loss   masked LM on the video (official), or the autoregressive alternative
  answer_loss                  stage 3: the LLM's next-token loss on answer tokens only

Why objectives here and not a `forward` of each stage's model: stage 1's teachers stay outside the
student's module tree (never in its optimizer, DDP wrapper or checkpoint), so its step is no one
module's forward; a function of (networks, batch, settings) reads the same in every stage, and the
scripts, bench.py, the tests and notebooks call that very function (the scripts wrap it in
common.WithLoss only because DDP needs a module). A batch is a dict of tensors on the device.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import gather_tokens, make_mask, patch_index, random_mask


# ------------------------------------------------------------------------------------------------
# stage 1

def distill_loss(pred, target):
    """Mean over every leading axis (layers, batch, tokens) of 2 - 2<u, v> = ||u - v||^2, for unit vectors u (student)
    and v (teacher): MSE on L2-normalised features, summed over channels (SM/engines/engine_for_pretraining.py:129-146).
    pred, target: (..., D), both already L2-normalised; computed in fp32."""
    return (2 - 2 * (pred.float() * target.float()).sum(-1)).mean()


def stage1_loss(student, targets, w_clip=1.0, w_clip_final=1.0, w_mae=1.0):
    """student: InternVideo2.forward_distill output; targets: the same keys, gathered at the student's
    visible slots (clip: (Kc, B, Nv, Dc), clip_final: (B, Dcf), mae: (Km, B, Nv-1, Dm)).
    Returns (total, {term: value}); total = w_clip * L_clip + w_clip_final * L_final + w_mae * L_mae,
    every weight 1 in the official recipe (SM/scripts/pretraining/1B_pt.sh:30, 38)."""
    parts, total = {}, 0.0
    for key, w in (("clip", w_clip), ("clip_final", w_clip_final), ("mae", w_mae)):
        if w and key in student:
            parts[key] = distill_loss(student[key], targets[key])
            total = total + w * parts[key]
    return total, parts


def stage1_objective(student, teachers, batch, *, mask_type="attention", mask_ratio=0.8, w_clip=1.0,
                     w_clip_final=1.0, w_mae=1.0):
    """One stage-1 step's loss (SM/engines/engine_for_pretraining.py:71-146): the frozen teachers read the whole clip
    (the video teacher all 2T frames, the image teacher the T even ones), the mask picks the tokens the student
    sees, the student runs on those alone, and the targets are gathered at the same slots.
    student: InternVideo2 built with_heads; teachers: teachers.Teachers (or a callable giving its dict);
    batch: video (B, 3, 2T, H, W), mask_noise (B, T', Np)."""
    video = batch["video"]
    target = teachers(video)                                   # no grad; every feature L2-normalised
    visible = make_mask(mask_type, batch["mask_noise"], mask_ratio, target["attn"])       # (B, 1 + Nv)
    out = student.forward_distill(video[:, :, ::2], visible)
    target = {"clip": gather_tokens(target["clip"], visible),             # (Kc, B, 1 + Nv, Dc), CLS too
              "clip_final": target["clip_final"],                         # (B, Dcf)
              "mae": gather_tokens(target["mae"], patch_index(visible))}  # (Km, B, Nv, Dm): no CLS
    return stage1_loss(out, target, w_clip, w_clip_final, w_mae)


# ------------------------------------------------------------------------------------------------
# cross-rank gather and the contrastive loss

def world_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's (B, ...) tensor. Backward: sum the incoming gradient over
    ranks (all-reduce) and return this rank's slice: every rank's loss term depends on every rank's
    features, so the gradient of a feature is the sum of what all ranks' losses send to it."""

    @staticmethod
    def forward(ctx, x):
        rank, world = world_info()
        chunks = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(chunks, x.contiguous())
        ctx.rank, ctx.b = rank, x.shape[0]
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def all_gather_with_grad(x):
    """(B, ...) per rank -> (world * B, ...), rank order. Identity without torch.distributed.

    Used with a loss over this rank's rows only (scored against every rank's columns) and DDP's
    gradient averaging, the parameter gradient is exactly the gradient of the one-process loss on
    the global batch. The official gather instead passes back only the local slice of the gradient
    of a loss computed over ALL rows on every rank, so its gradient is the global one divided by the
    world size (MM/models/utils.py:193-212). tests/test_losses.py checks ours on 2 gloo ranks."""
    rank, world = world_info()
    return x if world == 1 else _AllGather.apply(x)


def similarity(x, y):
    """(Nx, Ny) dot products of L2-normalised features. A (N, Q, D) side is a set of query embeddings
    (the Q-Former's): its similarity to a vector is the best query's (BLIP-2)."""
    x, y = x.float(), y.float()
    if x.ndim == 3:
        return torch.einsum("xqd,yd->xyq", x, y).amax(-1)
    if y.ndim == 3:
        return torch.einsum("xd,yqd->xyq", x, y).amax(-1)
    return x @ y.t()


def contrastive_loss(a, b, temp, ids=None):
    """Symmetric InfoNCE between L2-normalised a (B, D) or (B, Q, D) and b (B, D) at temperature temp.

    Rows are this rank's samples; columns are every rank's (gathered). Targets are "soft": every
    column with the same sample id as the row is a positive, weights summing to 1 (MM/models/criterions.py:201-216);
    without ids, the diagonal. Returns the mean of the a->b and b->a cross-entropies."""
    rank, world = world_info()
    B = a.shape[0]
    a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)
    if ids is None:
        ids = torch.arange(B, device=a.device) + rank * B
    ids_all = all_gather_with_grad(ids[:, None])[:, 0] if world > 1 else ids
    pos = (ids[:, None] == ids_all[None, :]).float()                  # (B, world*B)
    target = pos / pos.sum(1, keepdim=True)
    logits_ab = similarity(a, b_all) / temp                            # (B, world*B)
    logits_ba = similarity(b, a_all) / temp
    loss_ab = -(target * F.log_softmax(logits_ab, dim=1)).sum(1).mean()
    loss_ba = -(target * F.log_softmax(logits_ba, dim=1)).sum(1).mean()
    return (loss_ab + loss_ba) / 2


# ------------------------------------------------------------------------------------------------
# stage 2: matching with hard negatives, masked LM and the autoregressive alternative (MM/models/criterions.py:105-342)

@torch.no_grad()
def hard_negatives(sim, ids):
    """One negative column per row, drawn from softmax(sim) over the LOCAL batch with every positive
    (same sample id) excluded, as the official VTM. sim: (B, B) similarities / temperature.
    Returns (index (B,), valid (B,)): valid is False for a row with no negative at all (e.g. a batch
    of one clip), whose index is then meaningless and must be dropped, never used as a negative."""
    w = F.softmax(sim.float(), dim=1) + 1e-5
    w = w.masked_fill(ids[:, None] == ids[None, :], 0.0)
    valid = w.sum(1) > 0
    w[~valid] = 1.0                                         # placeholder rows, dropped by the caller
    return torch.multinomial(w, 1).squeeze(1), valid


def matching_loss(match_fn, text_states, pad_mask, memory, v_emb, t_emb, temp, ids):
    """VTM (and AVTM, and the Q-Former's matching): binary matching on (video, text) pairs = the B
    positives, each video with a hard negative text, each text with a hard negative video.
    match_fn(text_states, pad_mask, memory) -> (N, 2) logits (text_states may be token ids).
    v_emb, t_emb: raw embeddings, (B, D) or (B, Q, D), used to pick the negatives."""
    B = v_emb.shape[0]
    with torch.no_grad():
        sim = similarity(F.normalize(v_emb, dim=-1), F.normalize(t_emb, dim=-1)) / temp
        neg_t, ok_t = hard_negatives(sim, ids)              # a negative text for every video
        neg_v, ok_v = hard_negatives(sim.t(), ids)          # a negative video for every text
    keep = torch.cat([torch.ones(B, dtype=torch.bool, device=ok_t.device), ok_t, ok_v])
    # index_select, not x[idx]: the backward of advanced indexing accumulates repeated indices in a
    # thread-dependent order on CPUs, which made stage 2 differ from run to run (by ~1e-5 after 10 steps)
    states = torch.cat([text_states, text_states.index_select(0, neg_t), text_states])
    masks = torch.cat([pad_mask, pad_mask.index_select(0, neg_t), pad_mask])
    mems = torch.cat([memory, memory, memory.index_select(0, neg_v)])
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(v_emb.device)
    logits = match_fn(states[keep], masks[keep], mems[keep])
    return F.cross_entropy(logits.float(), labels[keep])


def mask_tokens(ids, pad_mask, vocab_size, mask_id, cls_id, prob=0.5):
    """BERT masking with the official 50% rate (MM/scripts/pretraining/stage2/1B/config.py:92): each non-[PAD],
    non-[CLS] token is picked with probability prob; of those 80% become [MASK], 10% a random token, 10% stay
    (MM/models/criterions.py:297-342). Returns (corrupted ids, labels with -100 at unpicked positions)."""
    allowed = pad_mask.bool() & (ids != cls_id)
    picked = (torch.rand(ids.shape, device=ids.device) < prob) & allowed
    labels = ids.masked_fill(~picked, -100)
    r = torch.rand(ids.shape, device=ids.device)
    out = torch.where(picked & (r < 0.8), torch.full_like(ids, mask_id), ids)
    random_tok = torch.randint(vocab_size, ids.shape, device=ids.device)
    out = torch.where(picked & (r >= 0.8) & (r < 0.9), random_tok, out)
    return out, labels


def token_cross_entropy(logits, labels):
    """Mean cross-entropy over labelled positions (-100 ignored); 0 (with a graph) if there are none."""
    if not (labels != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)


def mlm_loss(text_encoder, ids, pad_mask, memory, tok, prob=0.5):
    """Masked LM conditioned on the (masked) video: text layers on the corrupted ids, fusion layers
    cross-attending to `memory`, then the tied MLM head. Not autoregressive."""
    corrupted, labels = mask_tokens(ids, pad_mask, text_encoder.cfg.vocab_size, tok.mask_id, tok.cls_id, prob)
    h = text_encoder.forward_fusion(text_encoder.forward_text(corrupted, pad_mask), pad_mask, memory)
    return token_cross_entropy(text_encoder.mlm_logits(h), labels)


def next_token_loss(logits, ids, pad_mask):
    """Position j predicts token j+1; [PAD] targets ignored. logits (B, L, V), ids and pad_mask (B, L)."""
    return token_cross_entropy(logits[:, :-1], ids[:, 1:].masked_fill(pad_mask[:, 1:] == 0, -100))


def captioning_loss(text_encoder, ids, pad_mask, memory):
    """The autoregressive alternative, L = -log p(T_j | T_<j, video): every self-attention causal (text
    and fusion layers, so no position sees its successor), cross-attention to the video as in MLM,
    the tied head predicting the next token."""
    h = text_encoder.forward_fusion(text_encoder.forward_text(ids, pad_mask, causal=True), pad_mask, memory,
                                    causal=True)
    return next_token_loss(text_encoder.mlm_logits(h), ids, pad_mask)


STAGE2_LOSSES = ("vtc", "vtm", "mlm", "atc", "avtc", "avtm", "avmlm")
AUDIO_LOSSES = ("atc", "avtc", "avtm", "avmlm")


def stage2_objective(model, batch, *, tok, weights=None, captions=None, mask_ratio=0.8, mlm_prob=0.5,
                     mlm_mode="mlm"):
    """One stage-2 step's loss: every term reads the same randomly masked video, the text tower runs once per
    caption type, the temperature is clamped first (MM/models/internvideo2_stage2_visual.py:82-153, 261-266).
    batch: video (B, 3, T, H, W), mask_noise (B, T', Np), and ids_/mask_/pos_<key> (pos: multi-positive
    sample ids) per caption key in use, fbank (B, frames, mel) for audio terms. tok: has mask_id and
    cls_id. weights: {term: weight}; None = the official vtc, vtm, mlm (+ avtc, avtm, avmlm with audio),
    all 1. captions: {term: caption key}, "caption" where unnamed. mlm_mode: mlm (official) | causal."""
    if weights is None:
        weights = dict.fromkeys(("vtc", "vtm", "mlm") + (("avtc", "avtm", "avmlm") if model.has_audio else ()), 1.0)
    unknown = sorted(set(weights) - set(STAGE2_LOSSES))
    if unknown:
        raise ValueError(f"unknown stage-2 loss(es) {unknown}; the terms are {list(STAGE2_LOSSES)}")
    if not model.has_audio and set(weights) & set(AUDIO_LOSSES):
        raise ValueError(f"the audio losses {sorted(set(weights) & set(AUDIO_LOSSES))} need a model with audio")
    if mlm_mode not in ("mlm", "causal"):
        raise ValueError(f"mlm_mode must be mlm or causal, got {mlm_mode!r}")
    weights = {k: w for k, w in weights.items() if w}
    captions = {name: (captions or {}).get(name, "caption") for name in weights}
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    temp = model.temp
    visible = random_mask(batch["mask_noise"], mask_ratio)
    v_mem, v_emb = model.encode_video(batch["video"], visible)            # (B, 1 + Nv, Dm), (B, E)
    texts = {}
    for key in dict.fromkeys(captions.values()):           # each caption type once, in a fixed order
        ids, mask = batch[f"ids_{key}"], batch[f"mask_{key}"]
        texts[key] = (ids, mask, *model.encode_text(ids, mask))             # ids, mask, states, embedding
    a_emb = av_emb = av_mem = None
    if any(name in AUDIO_LOSSES for name in weights):                     # once per step, for every term
        a_mem, a_emb = model.encode_audio(batch["fbank"])                 # (B, Na, Dm), (B, E)
        av_mem, av_emb = torch.cat([a_mem, v_mem], 1), model.fuse_av(a_emb, v_emb)
    parts = {}
    for name in weights:
        t_ids, t_mask, t_states, t_emb = texts[captions[name]]
        ids = batch[f"pos_{captions[name]}"]                               # multi-positive sample ids
        if name in ("vtc", "atc", "avtc"):
            x = {"vtc": v_emb, "atc": a_emb, "avtc": av_emb}[name]
            parts[name] = contrastive_loss(F.normalize(x, dim=-1), F.normalize(t_emb, dim=-1), temp, ids)
        elif name in ("vtm", "avtm"):
            mem, x, head = (v_mem, v_emb, "itm") if name == "vtm" else (av_mem, av_emb, "avtm")
            match = lambda s, m, mm, head=head: model.match_logits(s, m, mm, head)
            parts[name] = matching_loss(match, t_states, t_mask, mem, x, t_emb, temp, ids)
        else:                                                              # mlm / avmlm
            mem = v_mem if name == "mlm" else av_mem
            parts[name] = (mlm_loss(model.text_encoder, t_ids, t_mask, mem, tok, mlm_prob)
                           if mlm_mode == "mlm" else captioning_loss(model.text_encoder, t_ids, t_mask, mem))
    return sum(weights[k] * v for k, v in parts.items()), parts


# ------------------------------------------------------------------------------------------------
# stage 3 (VC2/models/videochat_mistra/videochat2_it_mistral.py:231-319)

def answer_loss(logits, labels):
    """The LLM's next-token loss on answer tokens only: labels are -100 everywhere else (the system
    text, the instruction, the visual slots, padding). logits (B, L, V), labels (B, L)."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:])


def stage3_objective(model, batch, *, substage, video_at, qformer_text_input=True):
    """One stage-3 step's loss (VC2/models/videochat_mistra/videochat2_it_mistral.py:231-319). Sub-stage 1 (BLIP-2's
    alignment, video encoder frozen): query-caption contrastive (the best query counts), matching with hard negatives,
    Q-Former captioning, from ids_/mask_/pos_caption. Sub-stages 2-3: the LLM's next-token loss on the answer
    tokens of the chat llm_ids / llm_mask / llm_labels (data.build_chat), the Q-Former reading the
    instruction qf_ids / qf_mask when qformer_text_input. video_at: the chat's first visual slot."""
    video = batch["video"]
    with torch.set_grad_enabled(substage >= 2 and torch.is_grad_enabled()):
        tokens = model.video_tokens(video)                              # frozen in sub-stage 1
    if substage == 1:
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        ids, mask, sid = batch["ids_caption"], batch["mask_caption"], batch["pos_caption"]
        q, _ = model.qformer(tokens, mode="query")
        v_emb = model.vision_proj(q)                                    # (B, Q, E): one per query
        t_emb = model.text_proj(model.qformer(None, ids, mask, mode="text")[1][:, 0])
        vtc = contrastive_loss(F.normalize(v_emb, dim=-1), F.normalize(t_emb, dim=-1), model.temp, sid)
        match = lambda i, m, vid: model.itm_head(model.qformer(vid, i, m, mode="joint")[0]).mean(1)
        vtm = matching_loss(match, ids, mask, tokens, v_emb, t_emb, model.temp, sid)
        cap = next_token_loss(model.qformer.lm_logits(model.qformer(tokens, ids, mask, mode="caption")[1]), ids, mask)
        return vtc + vtm + cap, {"vtc": vtc, "vtm": vtm, "cap": cap}
    instr = (batch["qf_ids"], batch["qf_mask"]) if qformer_text_input else (None, None)
    visual = model.visual_embeds(tokens, *instr)                        # (B, Q, llm dim)
    logits, _ = model.llm(model.chat_embeds(batch["llm_ids"], visual, video_at), batch["llm_mask"])
    loss = answer_loss(logits, batch["llm_labels"])
    return loss, {"answer": loss}
