"""fsdp.py: FSDP2 sharding (`--fsdp` under torchrun), for students and LLMs too large for one GPU.

DDP (common.distribute) keeps a whole copy of the model on every rank; FSDP2 splits parameters, gradients and
AdamW state over the ranks instead (a 6B student's 97 GB of fp32 weights + AdamW become 97/N GB per GPU) and
all-gathers each block's weights just before it runs. The training step (common.train_step) is the same for
both; the few places where sharded tensors need their own handling are here:

  shard                   fully_shard every repeated block, then the root; scalars stay replicated
  gradient_sync           accumulate micro-batches unsharded, reduce on the last one
  average_replicated      the replicated scalars' gradients, averaged over the ranks by hand
  clip_gradients          one clipping norm over sharded (DTensor) and plain gradients together
  is_sharded, repeated_blocks

Checkpoints gather the shards to full tensors (common.model_state, optimizer_state, load_state), so an FSDP
run's ckpt.pt is the same file as a single process's. Tested with two gloo ranks on a CPU
(tests/test_stage1.py, tests/test_stage3.py).
"""
import torch
import torch.distributed as dist


def repeated_blocks(model):
    """The elements of every outermost nn.ModuleList: the transformer blocks (and the decoders).
    The unit of FSDP sharding and of regional compilation (common.compile_blocks)."""
    lists = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    outer = [n for n in lists if not any(n.startswith(o + ".") for o in lists if o != n and o)]
    return [blk for name in outer for blk in model.get_submodule(name)]


def shard(model, rt):
    """FSDP2: fully_shard every block, then the root; each block's weights are all-gathered just before it runs
    and freed after. Pass the WithLoss wrapper: its forward is the whole step, so the root's own
    parameters (embeddings, heads) are gathered for all of it, whichever methods the loss calls.
    Call before building the optimizer (parameters become DTensor shards). No-op without torchrun."""
    if not rt.ddp:
        return model
    from torch.distributed.fsdp import fully_shard
    for blk in repeated_blocks(model):
        fully_shard(blk)
    # FSDP2 shards along dim 0, so a scalar (the contrastive temperature) stays replicated on every
    # rank; average_replicated averages its gradient across ranks.
    scalars = [p for p in model.parameters() if p.ndim == 0]
    fully_shard(model, ignored_params=set(scalars) or None)
    model.replicated_params = scalars
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def gradient_sync(model, sync):
    """FSDP2's counterpart of DDP's no_sync(): gradients stay unsharded over the accumulated micro-batches and are
    reduce-scattered on the last one (sync=True)."""
    root = next(m for m in model.modules() if hasattr(m, "set_requires_gradient_sync"))
    root.set_requires_gradient_sync(sync)


def average_replicated(model, rt):
    """Average over the ranks the gradients of the parameters shard() left replicated (FSDP2 reduces only what it
    shards). A no-op for a model shard() did not touch."""
    for p in getattr(model, "replicated_params", ()):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= rt.world


def clip_gradients(params, max_norm):
    """clip_grad_norm_ over FSDP's sharded (DTensor) gradients mixed with plain ones (the replicated scalars): the
    norm of each kind, the sharded one reduced over ranks, combined, then one scale for all.
    Returns the total norm before clipping, a 0-d tensor."""
    with_grad = [p for p in params if p.grad is not None]
    groups = [g for g in ([p for p in with_grad if hasattr(p.grad, "full_tensor")],
                          [p for p in with_grad if not hasattr(p.grad, "full_tensor")]) if g]
    if not groups:
        return torch.zeros(())
    norms = []
    for group in groups:
        n = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = torch.stack([n.float() for n in norms]).norm()
    for group in groups:
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
