"""losses.py: every loss of nano-InternVideo2, each a small function that works with or without
torch.distributed initialised.

  distill_loss / stage1_loss   stage 1: 2 - 2cos between L2-normalised student and teacher features
                               (FACTS 1.7), three weighted terms
  all_gather_with_grad         the one cross-rank gather: exact gradients (see its docstring)
  contrastive_loss             symmetric InfoNCE with multi-positive targets from sample ids, every
                               rank seeing every negative (the toy CLIP teacher; stage-2 VTC)
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# stage 1

def distill_loss(pred, target):
    """Mean over every leading axis (layers, batch, tokens) of 2 - 2<u, v> = ||u - v||^2, for unit
    vectors u (student) and v (teacher): an MSE on L2-normalised features, summed over channels
    (FACTS 1.7). pred, target: (..., D), both already L2-normalised; computed in fp32."""
    return (2 - 2 * (pred.float() * target.float()).sum(-1)).mean()


def stage1_loss(student, targets, w_clip=1.0, w_clip_final=1.0, w_mae=1.0):
    """student: InternVideo2.forward_distill output; targets: the same keys, gathered at the student's
    visible slots (clip: (Kc, B, Nv, Dc), clip_final: (B, Dcf), mae: (Km, B, Nv-1, Dm)).
    Returns (total, {term: value}); total = w_clip * L_clip + w_clip_final * L_final + w_mae * L_mae,
    every weight 1 in the official recipe (FACTS 1.7)."""
    parts, total = {}, 0.0
    for key, w in (("clip", w_clip), ("clip_final", w_clip_final), ("mae", w_mae)):
        if w and key in student:
            parts[key] = distill_loss(student[key], targets[key])
            total = total + w * parts[key]
    return total, parts


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
    world size (FACTS 2.6, 6.14). tests/test_losses.py checks ours on 2 gloo ranks."""
    rank, world = world_info()
    return x if world == 1 else _AllGather.apply(x)


def contrastive_loss(a, b, temp, ids=None):
    """Symmetric InfoNCE between L2-normalised a (B, D) and b (B, D) at temperature temp.

    Rows are this rank's samples; columns are every rank's (gathered). Targets are "soft": every
    column with the same sample id as the row is a positive, weights summing to 1 (FACTS 2.6);
    without ids, the diagonal. Returns the mean of the a->b and b->a cross-entropies."""
    rank, world = world_info()
    B = a.shape[0]
    a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)
    if ids is None:
        ids = torch.arange(B, device=a.device) + rank * B
    ids_all = all_gather_with_grad(ids[:, None])[:, 0] if world > 1 else ids
    pos = (ids[:, None] == ids_all[None, :]).float()                  # (B, world*B)
    target = pos / pos.sum(1, keepdim=True)
    logits_ab = a.float() @ b_all.float().t() / temp                   # (B, world*B)
    logits_ba = b.float() @ a_all.float().t() / temp
    loss_ab = -(target * F.log_softmax(logits_ab, dim=1)).sum(1).mean()
    loss_ba = -(target * F.log_softmax(logits_ba, dim=1)).sum(1).mean()
    return (loss_ab + loss_ba) / 2
