"""losses.py: hand computations, and the contrastive loss on 2 gloo ranks equal to one process."""
import math

import torch
import torch.nn.functional as F

from conftest import run_two_ranks, save_result
from losses import contrastive_loss, distill_loss, stage1_loss


def test_distill_loss_is_2_minus_2cos_averaged_over_everything():
    torch.manual_seed(0)
    s, t = F.normalize(torch.randn(3, 2, 5, 8), dim=-1), F.normalize(torch.randn(3, 2, 5, 8), dim=-1)
    by_hand = sum(2 - 2 * float(s[k, b, n] @ t[k, b, n]) for k in range(3) for b in range(2) for n in range(5)) / 30
    assert math.isclose(float(distill_loss(s, t)), by_hand, rel_tol=1e-5)
    assert float(distill_loss(s, s)) < 1e-6
    torch.testing.assert_close(distill_loss(s, t), ((s - t) ** 2).sum(-1).mean())   # = ||u - v||^2


def test_stage1_loss_weights_terms():
    torch.manual_seed(0)
    out = {k: F.normalize(torch.randn(*shape), dim=-1) for k, shape in
           (("clip", (2, 3, 4, 8)), ("clip_final", (3, 8)), ("mae", (2, 3, 3, 8)))}
    tgt = {k: F.normalize(torch.randn_like(v), dim=-1) for k, v in out.items()}
    total, parts = stage1_loss(out, tgt, 1.0, 2.0, 0.5)
    assert set(parts) == {"clip", "clip_final", "mae"}
    assert math.isclose(float(total), float(parts["clip"] + 2 * parts["clip_final"] + 0.5 * parts["mae"]), rel_tol=1e-6)


def test_contrastive_loss_equals_hand_computation_with_multi_positives():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(4, 6), dim=-1)
    ids = torch.tensor([0, 1, 1, 2])                        # samples 1 and 2 share an id: both positives
    temp = 0.1

    def one_side(x, y):
        total = 0.0
        for i in range(4):
            logits = [float(x[i] @ y[j]) / temp for j in range(4)]
            lse = math.log(sum(math.exp(l) for l in logits))
            pos = [j for j in range(4) if ids[j] == ids[i]]
            total += -sum(logits[j] - lse for j in pos) / len(pos)
        return total / 4
    expected = (one_side(a, b) + one_side(b, a)) / 2
    assert math.isclose(float(contrastive_loss(a, b, temp, ids)), expected, rel_tol=1e-5)
    # without ids the diagonal is the only positive: the usual CLIP loss
    logits = a @ b.t() / temp
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    torch.testing.assert_close(contrastive_loss(a, b, temp), clip)


def _global_batch():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 5)
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    ids = torch.tensor([0, 1, 2, 3, 3, 4, 5, 0])           # positives across the two ranks' halves
    return net, x, y, ids


def _contrastive_rank(rank, world, init, out):
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    net, x, y, ids = _global_batch()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    sl = slice(rank * 4, rank * 4 + 4)
    loss = contrastive_loss(F.normalize(ddp(x[sl]), dim=-1), F.normalize(ddp(y[sl]), dim=-1), 0.05, ids[sl])
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    result = {"loss": sum(losses) / world, "grads": [p.grad.clone() for p in net.parameters()]}
    save_result(result, out)
    dist.destroy_process_group()


def test_contrastive_loss_and_grads_on_two_ranks_equal_one_process(tmp_path):
    net, x, y, ids = _global_batch()
    loss = contrastive_loss(F.normalize(net(x), dim=-1), F.normalize(net(y), dim=-1), 0.05, ids)
    loss.backward()
    for r in run_two_ranks(_contrastive_rank, tmp_path):
        torch.testing.assert_close(r["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
        for g, p in zip(r["grads"], net.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)
