"""teachers.py: the two frozen stage-1 teachers, their checkpoint loading, and pre-training of the toy
teachers on ToyWorld.

  InternViTTeacher   image teacher (InternViT-6B of InternVL-C, SM/models/internvl_clip_vision.py:336-465): runs
                     frame by frame; returns the last K blocks' tokens with the frame-averaged CLS,
                     the frame-averaged pooled vector, and its pooling query's attention per frame
  VideoMAETeacher    video teacher (VideoMAEv2-g; SM/models/videomae.py:329-338): tubelet 2 over twice the student's
                     frames; returns the last K blocks' tokens, the final LayerNorm on the last only
  Teachers           both, frozen and kept OUTSIDE the student: not its submodules, so never in its
                     optimizer, its DDP wrapper or its checkpoint, and never back in training mode
  Float8Linear       FP8 teachers (--teacher_dtype=float8): a frozen nn.Linear with e4m3 weights (per output
                     channel scales) and e4m3 activations (per token), through torch._scaled_mm on FP8 GPUs;
                     to_float8 / float8_teachers swap them in

Both reuse model.py's blocks; their parameter names are the official checkpoint keys. The toy
teachers carry real signal on ToyWorld: the image teacher is trained as a small CLIP (frame-caption
contrastive), the video teacher on ToyWorld's 8 motion classes (direction x speed; the official teacher knows
motion from masked pixel reconstruction at scale, which the toy network does not learn in CPU minutes, so
that objective, 90% tube masking, is here as `mae_steps` but off by default), and each is saved in its
official checkpoint layout, so loading them runs the same code as loading InternVL-C or VideoMAEv2-g. The
repository ships them in toys/ (pretrain_toys.py rebuilds them with the toy BERT and LLM).

    python teachers.py --data=data/toyworld --out=out/teachers     # about 8 minutes on 2 CPU cores
"""
import math
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from checkpoints import key_names, released_state
from common import CheckpointError
from model import (Attention, AttentionPool, Block, PatchEmbed, PoolCrossAttention, VisionConfig, count_params,
                   patch_index, preset, sincos_2d, sinusoid_table, tube_mask)

# Official teacher shapes (SM/models/internvl_clip_vision.py:336-363; SM/models/videomae.py:329-332), without drop path.
CLIP_TEACHER_PRESETS = {
    "toy": VisionConfig(img_size=32, patch_size=8, num_frames=8, dim=96, depth=4, heads=4,
                        mlp_dim=384, layerscale=0.1, drop_path=0.0, pool_heads=4, pool_dim=96,
                        clip_return_layers=2, mae_return_layers=0),
    "internvit-6b": VisionConfig(dim=3200, depth=48, heads=25, mlp_dim=12800, layerscale=0.1,
                                 drop_path=0.0, clip_return_layers=6, mae_return_layers=0),
}
MAE_TEACHER_PRESETS = {
    "toy": VisionConfig(img_size=32, patch_size=8, num_frames=16, tubelet_size=2, dim=96, depth=4,
                        heads=4, mlp_dim=384, qkv_bias="qv", qk_norm=False, norm="ln", layerscale=0.0,
                        act="gelu", drop_path=0.0, clip_return_layers=0, mae_return_layers=2),
    "videomae-g": VisionConfig(num_frames=16, tubelet_size=2, dim=1408, depth=40, heads=16,
                               mlp_dim=6144, qkv_bias="qv", qk_norm=False, norm="ln", layerscale=0.0,
                               act="gelu", drop_path=0.0, clip_return_layers=0, mae_return_layers=4),
}


def teacher_preset(table, name):
    return preset(table, name, "teacher")


class InternViTTeacher(nn.Module):
    """InternViT-style image teacher; every frame is an independent image of 1 + HW tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg = replace(cfg, tubelet_size=1, num_frames=1)
        self.patch_embed = PatchEmbed(cfg)                     # Conv3d, temporal kernel 1 ("inflated")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        # 2-D, frozen (SM/models/internvl_clip_vision.py:390); official: from the checkpoint, toy: sin-cos
        table = torch.cat([torch.zeros(1, cfg.dim), sincos_2d(cfg.dim, cfg.grid[1]).float()])
        self.pos_embed = nn.Parameter(table[None].clone(), requires_grad=False)   # (1, 1+HW, D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.clip_projector = AttentionPool(cfg.dim, cfg.pool_heads, cfg.pool_dim)
        _init_linear(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def tokens(self, frames, layers=()):
        """frames: (B', 3, 1, H, W) -> last block (B', 1+HW, D) and {block: (B', 1+HW, D)}."""
        x = self.patch_embed(frames).flatten(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        hidden = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in layers:
                hidden[i] = x
        return x, hidden

    def encode_image(self, images):
        """images (B, 3, H, W) -> pooled (B, pool_dim), un-normalised (toy CLIP training)."""
        return self.clip_projector(self.tokens(images[:, :, None])[0])

    def forward(self, video):
        """video (B, 3, T, H, W) -> dict, all L2-normalised per token (SM/models/internvl_clip_vision.py:445-463):
        clip (K, B, 1 + T*HW, D): last K blocks, ascending; CLS averaged over frames, then all patches
        clip_final (B, pool_dim): pooled vector averaged over frames
        attn (B, T, HW): the pooling query's head-averaged attention over each frame's patches."""
        B, T = video.shape[0], video.shape[2]
        K, D = self.cfg.clip_return_layers, self.cfg.dim
        frames = rearrange(video, "b c t h w -> (b t) c 1 h w")           # every frame an image
        x, hidden = self.tokens(frames, layers=range(self.cfg.depth - K, self.cfg.depth))
        pooled, attn = self.clip_projector(x, need_weights=True)          # (BT, P), (BT, 1+HW)
        z = torch.stack([hidden[i] for i in sorted(hidden)])              # (K, BT, 1+HW, D)
        cls = z[:, :, :1].reshape(K, B, T, 1, D).mean(2)                  # (K, B, 1, D)
        z = torch.cat([cls, z[:, :, 1:].reshape(K, B, -1, D)], dim=2)     # (K, B, 1+T*HW, D)
        return {"clip": F.normalize(z, dim=-1),
                "clip_final": F.normalize(pooled.reshape(B, T, -1).mean(1), dim=-1),
                "attn": attn[:, 1:].reshape(B, T, -1)}


class VideoMAETeacher(nn.Module):
    """VideoMAEv2-style video teacher: no CLS, fixed 1-D sinusoid positions, LayerNorm blocks with
    q/v biases and exact GELU, a final `norm`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_patches, cfg.dim), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        _init_linear(self)

    def forward_features(self, video, visible=None):
        """(B, 3, 2T, H, W) -> tokens after the final norm (B, Nv, D), for visible indices (B, Nv)."""
        x = self.patch_embed(video).flatten(1, 2) + self.pos_embed
        if visible is not None:
            x = x.gather(1, visible[..., None].expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, video):
        """-> (K, B, N, D): the last K blocks, ascending, final LayerNorm on the last one only, every
        token L2-normalised (SM/models/videomae.py:296-306)."""
        K, depth = self.cfg.mae_return_layers, self.cfg.depth
        x = self.patch_embed(video).flatten(1, 2) + self.pos_embed
        z = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i == depth - 1:
                x = self.norm(x)
            if i >= depth - K:
                z.append(x)
        return F.normalize(torch.stack(z), dim=-1)


def _init_linear(net):
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# frozen pair

def freeze(net):
    """No gradients, eval mode, and `train()` made a no-op: a frozen teacher never trains again."""
    net.requires_grad_(False).eval()
    for m in net.modules():
        m.train = lambda mode=True, _m=m: _m
    return net


class Teachers:
    """The frozen teacher pair. A plain object, not an nn.Module, so nothing of the student (its
    .train(), optimizer, DDP wrapper, state_dict) ever reaches it."""

    def __init__(self, clip, mae):
        self.clip, self.mae = freeze(clip), freeze(mae)

    def to(self, device=None, dtype=None):
        for net in (self.clip, self.mae):
            net.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, video):
        """video (B, 3, 2T, H, W): the MAE teacher sees all 2T frames (tubelet 2), the image teacher (like
        the student) the even ones (SM/engines/engine_for_pretraining.py:83-95). Returns clip, clip_final, attn, mae."""
        out = self.clip(video[:, :, ::2])
        out["mae"] = self.mae(video)
        return out


def load_teacher(kind, preset, path, **overrides):
    """Build a teacher and load its checkpoint in the official layout:
    image teacher: {'module': state} (DeepSpeed), 2-D patch kernel inflated to Conv3d, pos_embed
    resized bicubically if the grid differs; video teacher: {'model': {'encoder.' + key: ...}}.
    Missing or mis-shaped keys raise KeyError naming them; unexpected keys are listed and ignored."""
    table, Net = (CLIP_TEACHER_PRESETS, InternViTTeacher) if kind == "clip" else (MAE_TEACHER_PRESETS, VideoMAETeacher)
    net = Net(replace(teacher_preset(table, preset), **overrides))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} teacher checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                             # not a checkpoint at all: one line
        raise CheckpointError(f"{path} is not a readable {kind} teacher checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    state = released_state(raw)
    if kind == "mae" and any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    own = net.state_dict()
    if kind == "clip":
        w = state.get("patch_embed.proj.weight")
        if w is not None and w.ndim == 4:                              # (D, 3, p, p) -> (D, 3, 1, p, p)
            state["patch_embed.proj.weight"] = w[:, :, None]
        pe = state.get("pos_embed")
        if pe is not None and pe.shape != own["pos_embed"].shape and pe.ndim == 3:
            state["pos_embed"] = _resize_pos_2d(pe, own["pos_embed"].shape[1] - 1)
    missing = [k for k in own if k not in state]
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or bad_shape:
        raise CheckpointError(f"{path} does not fit the {preset} {kind} teacher: missing {missing[:20]}"
                       f"{' ...' if len(missing) > 20 else ''}; wrong shapes {bad_shape[:20]}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        print(f"{path}: ignoring {len(unexpected)} keys the {kind} teacher does not use: {key_names(unexpected)}")
    net.load_state_dict({k: state[k] for k in own})
    return net


def _resize_pos_2d(pe, n_new):
    D, old = pe.shape[-1], int(math.isqrt(pe.shape[1] - 1))
    new = int(math.isqrt(n_new))
    grid = pe[:, 1:].reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pe.dtype)], dim=1)


def build_teachers(clip_preset, mae_preset, clip_ckpt=None, mae_ckpt=None, mae_attention="standard"):
    """The frozen pair; a None checkpoint leaves that teacher randomly initialised (benchmarks, tests).
    mae_attention: the video teacher's attention_layout ("official": as the released stage-1 code runs it)."""
    clip = (load_teacher("clip", clip_preset, clip_ckpt) if clip_ckpt
            else InternViTTeacher(teacher_preset(CLIP_TEACHER_PRESETS, clip_preset)))
    mae = (load_teacher("mae", mae_preset, mae_ckpt, attention_layout=mae_attention) if mae_ckpt
           else VideoMAETeacher(replace(teacher_preset(MAE_TEACHER_PRESETS, mae_preset), attention_layout=mae_attention)))
    return Teachers(clip, mae)


# ------------------------------------------------------------------------------------------------
# FP8 teachers (--teacher_dtype=float8): the frozen teachers' nn.Linear layers in e4m3
#
# The teachers' forward is most of a stage-1 step (1.32 s of 1.60 s on an H100, README), and almost all
# of it is Linear layers; Hopper's tensor cores multiply e4m3 twice as fast as bf16. Only nn.Linear is
# replaced: attention, norms, the patch embedding and the residual stream stay in the teachers' dtype.
# Weights: per output channel, quantised once at conversion; activations: per token (or per tensor),
# at every call. x ~ q * scale with scale = amax / 448, so each row's largest |value| lands on 448.

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max            # 448: 1.75 * 2^8, the largest finite e4m3


def to_e4m3(y):
    """Saturating cast to e4m3: clamp to +-448 first (whether an out-of-range cast saturates or gives NaN
    is up to the backend; e4m3fn has no infinity), then round to nearest (even)."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_e4m3(x, dim=-1):
    """x (..., K) -> (q e4m3 of x's shape, scale fp32 with `dim` kept as size 1), x ~ q.float() * scale.
    dim=-1: one scale per row (a weight's output channel, an activation's token); dim=None: one for the
    tensor (all dims kept as 1). A row of zeros gets scale 1 (q = 0; no 0/0 NaN)."""
    x = x.float()
    dims = tuple(range(x.ndim)) if dim is None else dim
    amax = x.abs().amax(dim=dims, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return to_e4m3(x / scale), scale


def fp8_matmul_available(device):
    """torch._scaled_mm's e4m3 kernels need FP8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Float8Linear(nn.Module):
    """A frozen nn.Linear in FP8: y = (q_x @ q_w^T) * s_x * s_w + b, output in x's dtype (the autocast
    dtype under autocast, as nn.Linear's).

    backend "scaled_mm": torch._scaled_mm, row-wise scaling. It takes A (M, K) e4m3 row-major, B (K, N) e4m3
    column-major (our (N, K) weight, transposed: a view), scale_a (M, 1) and scale_b (1, N) fp32 contiguous,
    K and N multiples of 16, and on CUDA a bf16 output (torch/_meta_registrations.py, _check_scaled_mm_sizes);
    the bias is added after. "reference": the same quantised numbers in float32 (an e4m3 x e4m3 product is
    exact in fp32), for CPUs and GPUs without FP8. "auto": scaled_mm where fp8_matmul_available, else
    reference; re-decided whenever the module moves to another device."""

    def __init__(self, linear: nn.Linear, per_token=True, backend="auto"):
        super().__init__()
        if backend not in ("auto", "scaled_mm", "reference"):
            raise ValueError(f"backend must be auto, scaled_mm or reference, got {backend!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.per_token, self.requested = per_token, backend
        w, s = quantize_e4m3(linear.weight.detach(), dim=1)                   # (N, K) e4m3, (N, 1) fp32
        self.weight_fp8 = nn.Parameter(w, requires_grad=False)                # a Parameter: count_params sees it
        self.register_buffer("weight_scale", s.t().contiguous())              # (1, N): scale_b's layout
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.backend = self._pick_backend()

    def _pick_backend(self):
        if self.requested != "auto":
            return self.requested
        return "scaled_mm" if fp8_matmul_available(self.weight_fp8.device) else "reference"

    def _apply(self, fn, recurse=True):
        """nn.Module.to(dtype) casts every floating-point tensor, and e4m3 is one to torch: the e4m3 weight
        and its fp32 scales follow the device only (the bias follows the dtype too, as any parameter)."""
        device = fn(torch.empty(0, device=self.weight_fp8.device)).device
        w, s = self._parameters.pop("weight_fp8"), self._buffers.pop("weight_scale")
        super()._apply(fn, recurse)
        self.weight_fp8 = nn.Parameter(w.data.to(device), requires_grad=False)
        self.register_buffer("weight_scale", s.to(device))
        self.backend = self._pick_backend()
        return self

    def forward(self, x):                                               # x: (..., K) -> (..., N)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.reshape(-1, self.in_features)                            # (M, K): every token a row
        xq, xs = quantize_e4m3(x2, dim=-1 if self.per_token else None)  # (M, K) e4m3, (M, 1) or (1, 1) fp32
        xq, xs = xq.contiguous(), xs.expand(x2.shape[0], 1).contiguous()  # per tensor: the one scale on every row
        if self.backend == "scaled_mm":
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        else:
            with torch.autocast(dev, enabled=False):                    # fp32, even inside bf16 autocast
                y = (xq.float() @ self.weight_fp8.float().t()) * xs * self.weight_scale
        y = y.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations per {'token' if self.per_token else 'tensor'}, backend={self.backend}")


def to_float8(net, per_token=True, backend="auto"):
    """Replace, in place, every nn.Linear of a frozen teacher by a frozen Float8Linear (call it after the
    teacher is on its device and dtype). Skipped, with the reason: in/out features not multiples of 16
    (_scaled_mm's kernels need them). Returns (converted names, {skipped name: why})."""
    converted, skipped = [], {}
    for parent_name, parent in list(net.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{parent_name}.{name}" if parent_name else name
            if child.in_features % 16 or child.out_features % 16:
                skipped[full] = f"{child.in_features} -> {child.out_features} not multiples of 16"
            else:
                setattr(parent, name, freeze(Float8Linear(child, per_token, backend)))
                converted.append(full)
    return converted, skipped


def float8_teachers(teachers, per_token=True, backend="auto"):
    """Both teachers' Linears to FP8 (to_float8); returns one line saying what was converted, what was
    skipped (grouped by reason) and which matmul runs."""
    words = []
    for kind, net in (("clip", teachers.clip), ("mae", teachers.mae)):
        converted, skipped = to_float8(net, per_token, backend)
        reasons = {}
        for why in skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        words.append(f"{kind} {len(converted)}/{len(converted) + len(skipped)} Linears in e4m3"
                     + "".join(f", {n} skipped ({why})" for why, n in reasons.items()))
    mods = [m for net in (teachers.clip, teachers.mae) for m in net.modules() if isinstance(m, Float8Linear)]
    how = {m.backend for m in mods}
    return (f"float8 teachers: {'; '.join(words)}; activations per {'token' if per_token else 'tensor'}, matmul "
            f"{'/'.join(sorted(how)) or 'none'}" + (" (dequantised fp32 matmul: FP8's numbers, not its speed)"
                                                    if "reference" in how else ""))


# ------------------------------------------------------------------------------------------------
# toy teacher pre-training (the real teachers come pre-trained; ToyWorld's must learn something first)

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


class MAEDecoder(nn.Module):
    """Toy VideoMAE decoder: encoder tokens + mask tokens -> 2 blocks -> pixels of each tubelet."""

    def __init__(self, cfg: VisionConfig, dim=64, depth=2):
        super().__init__()
        dcfg = replace(cfg, dim=dim, depth=depth, heads=4, mlp_dim=4 * dim, qkv_bias="qv", layerscale=0.0)
        self.embed = nn.Linear(cfg.dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sinusoid_table(cfg.num_patches, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dcfg) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 3 * cfg.tubelet_size * cfg.patch_size ** 2)

    def forward(self, x, visible, n_tokens):          # x: (B, Nv, De) -> (B, N, pixels per tubelet)
        B = x.shape[0]
        full = self.mask_token.expand(B, n_tokens, -1).clone()
        full = full.scatter(1, visible[..., None].expand(-1, -1, full.shape[-1]), self.embed(x))
        full = full + self.pos
        for blk in self.blocks:
            full = blk(full)
        return self.head(self.norm(full))


def tubelet_pixels(video, cfg):
    """(B, 3, T, H, W) -> (B, N, t*p*p*3): the pixels of each tubelet, in the patch embedding's
    (t, h, w) token order. The toy target is the (ImageNet-normalised) pixels themselves: VideoMAE's
    per-patch normalised target would make ToyWorld's static noise texture, unpredictable under a
    tube mask, dominate the loss."""
    t, p = cfg.tubelet_size, cfg.patch_size
    return rearrange(video, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=t, ph=p, pw=p)


def pretrain_toy_teachers(data_root, out_dir, clip_steps=2000, mae_steps=0, motion_steps=400, batch=64, lr=2e-3,
                          mae_ratio=0.9, seed=0, log=print, history=None, verbose=True, clip_mean_weight=1.0):
    """Train the toy image teacher (CLIP) and video teacher (optionally VideoMAE, 90% tube masking, then
    the motion classes) on ToyWorld's train split and save them in the official layouts. Returns the two
    checkpoint paths; the loss curves go to history['clip'], ['mae'] and ['motion'] when a dict is given.
    clip_mean_weight: weight of a second CLIP term on the image teacher's mean patch token (through its own
    projection, not saved): the student distils the teacher's tokens, and with the pooled vector alone they
    carry shape only where the pooling looks (a linear probe on their mean reads shape 0.80; with the term 0.97)."""
    from common import fit
    from data import ATTRIBUTES, VideoTextDataset, train_loader
    from losses import contrastive_loss
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

    # video teacher: VideoMAE, 90% tube masking, pixels of the hidden tubelets as targets
    mae, dec = VideoMAETeacher(mae_cfg), MAEDecoder(mae_cfg)
    T, Np, N = mae_cfg.grid[0], mae_cfg.grid[1] * mae_cfg.grid[2], mae_cfg.num_patches
    ds = VideoTextDataset(jsonl, mae_cfg.num_frames, mae_cfg.img_size, train=True, seed=seed + 1,
                          noise_grid=(T, Np), crop_scale=(0.6, 1.0))

    def mae_loss(b):
        visible = patch_index(tube_mask(b["mask_noise"], mae_ratio))     # patch indices (no CLS here)
        pred = dec(mae.forward_features(b["video"], visible), visible, N)  # (B, N, pixels)
        hidden = torch.ones(pred.shape[:2], dtype=torch.bool).scatter(1, visible, False)
        return ((pred - tubelet_pixels(b["video"], mae_cfg)) ** 2).mean(-1)[hidden].mean()
    if mae_steps:
        loader = iter(train_loader(ds, batch, 0, 1, seed + 1, 0, workers=1))
        fit("toy video teacher (VideoMAE)", list(mae.parameters()) + list(dec.parameters()),
            lambda s: mae_loss(next(loader)), mae_steps, lr, 0.05, (0.9, 0.95), history.setdefault("mae", []), verbose)

    # then (or instead: the default) ToyWorld's 8 motion classes, direction x speed, from the mean token
    # (VideoMAE's fine-tuning head), on uncropped clips: a crop would change the apparent speed
    directions, speeds = ATTRIBUTES["direction"], ATTRIBUTES["speed"]
    head = nn.Linear(mae_cfg.dim, len(directions) * len(speeds))

    def motion_loss(b):
        y = torch.tensor([directions.index(a["direction"]) * len(speeds) + speeds.index(a["speed"]) for a in b["attrs"]])
        return F.cross_entropy(head(mae.forward_features(b["video"]).mean(1)), y)
    if motion_steps:
        ds.extra, ds.crop_scale = (lambda rec, rng: {"attrs": rec["attrs"]}), (1.0, 1.0)
        loader = iter(train_loader(ds, batch, 0, 1, seed + 2, 0, workers=1))
        fit("toy video teacher (motion classes)", list(mae.parameters()) + list(head.parameters()),
            lambda s: motion_loss(next(loader)), motion_steps, lr / 2, 0.05, (0.9, 0.999),
            history.setdefault("motion", []), verbose)
    mae_path = out_dir / "toy_mae_teacher.pt"
    torch.save({"model": {"encoder." + k: v for k, v in mae.state_dict().items()}, "config": asdict(mae_cfg)},
               mae_path)
    curve = lambda k: f"{history[k][0]:.3f} -> {history[k][-1]:.3f}" if history.get(k) else "skipped"
    log(f"toy teachers saved: {clip_path} ({count_params(clip) / 1e6:.2f}M, CLIP loss {curve('clip')}), {mae_path} "
        f"({count_params(mae) / 1e6:.2f}M, MAE loss {curve('mae')}, motion loss {curve('motion')})")
    return clip_path, mae_path


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Pre-train the two toy teachers on ToyWorld.")
    for name, default in (("data", "data/toyworld"), ("out", "out/teachers"), ("clip_steps", 2000), ("mae_steps", 0),
                          ("motion_steps", 400), ("batch", 64)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    a = p.parse_args()
    from data import make_toyworld
    make_toyworld(a.data)
    t0 = time.time()
    pretrain_toy_teachers(a.data, a.out, a.clip_steps, a.mae_steps, a.motion_steps, a.batch)
    print(f"done in {time.time() - t0:.0f}s")
