"""model.py: every network of nano-InternVideo2, in one file, plain PyTorch.

Read top to bottom:
  configs and presets   VisionConfig + VISION_PRESETS (toy, S, B, L, 1B, 6B; FACTS 1.1)
  primitives            RMSNorm, attend() (the one attention, on F.scaled_dot_product_attention),
                        Attention, Mlp, LayerScale, DropPath, Block, PatchEmbed, AttentionPool
  position tables       3-D sin-cos (FACTS 1.2), 1-D sinusoid (VideoMAE), temporal interpolation
  video encoder         InternVideo2: tubelet embedding, CLS, learnable pos-embed, pre-norm blocks
                        with RMSNorm + qk-norm + LayerScale, no final norm, attention-pooling head,
                        a masked forward over visible tokens only, and the stage-1 distillation heads.

How InternVideo2 differs from a textbook ViT (each point is FACTS.md section 6):
  * qk-norm is ONE RMSNorm over the full width (all heads jointly), not per head;
  * there is no final norm: features are the raw residual stream;
  * the MLP uses tanh-approximate GELU (the official fused MLP's default);
  * the pooled vector comes from an attention-pooling block whose query is the mean of ALL tokens
    (CLS included), with separate LayerNorms for q, k and v and no residual;
  * the masked forward adds the position embedding first, then keeps the visible tokens (CLS always).

Module and parameter names follow the official checkpoint keys (FACTS 4.1), so an official
state dict loads with `load_state_dict` and no mapping table.

    python model.py            # prints the parameter table of every preset (meta device, instant)
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ------------------------------------------------------------------------------------------------
# configs and presets

@dataclass
class VisionConfig:
    """A ViT over video. The same dataclass describes the student and both teachers (teachers.py)."""
    img_size: int = 224
    patch_size: int = 14
    num_frames: int = 8            # frames the network sees (student: 8 in stage 1, FACTS 1.3)
    tubelet_size: int = 1          # frames per Conv3d patch (student 1, VideoMAE teacher 2)
    embed_dim: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_ratio: float = 48 / 11     # hidden = int(dim * ratio): 6144 for 1B (FACTS 1.1)
    qkv_bias: str = "none"         # "none" (InternVideo2, InternViT) | "qv" (VideoMAE: q and v only)
    qk_norm: bool = True           # RMSNorm over the full width on q and k (FACTS 6.1)
    norm: str = "rms"              # "rms" (eps 1e-6) | "ln" (VideoMAE, eps 1e-6)
    layerscale: float = 1e-5       # LayerScale init; 0 = no LayerScale (FACTS 1.2)
    act: str = "gelu_tanh"         # "gelu_tanh" (official fused MLP) | "gelu" (exact, VideoMAE)
    drop_path: float = 0.25        # stochastic depth at the last block, linear from 0 (FACTS 1.2)
    pool_heads: int = 16           # attention-pooling head (clip_projector)
    pool_dim: int = 768            # its output width (clip_embed_dim)
    # stage-1 distillation heads (FACTS 1.6); they exist only when the model is built with heads
    clip_teacher_dim: int = 3200   # InternViT-6B token width
    clip_teacher_final_dim: int = 768  # InternViT-6B pooled width; 0 = no final-feature head
    clip_return_layers: int = 6    # last K blocks aligned to the image teacher
    mae_teacher_dim: int = 1408    # VideoMAEv2-g token width
    mae_return_layers: int = 4     # last K blocks aligned to the video teacher

    @property
    def grid(self):                # (T', H', W') token grid
        return (self.num_frames // self.tubelet_size, self.img_size // self.patch_size,
                self.img_size // self.patch_size)

    @property
    def num_patches(self):
        t, h, w = self.grid
        return t * h * w

    def validate(self):
        """Raise ValueError naming the field for shapes the network cannot be built with."""
        checks = [
            (self.img_size % self.patch_size == 0, "img_size must be a multiple of patch_size"),
            (self.num_frames % self.tubelet_size == 0, "num_frames must be a multiple of tubelet_size"),
            (self.embed_dim % self.num_heads == 0, "embed_dim must be divisible by num_heads"),
            (self.embed_dim % self.pool_heads == 0, "embed_dim must be divisible by pool_heads"),
            (self.embed_dim % 16 == 0, "embed_dim must be a multiple of 16 (3-D sin-cos table)"),
            (self.qkv_bias in ("none", "qv"), "qkv_bias must be 'none' or 'qv'"),
            (self.norm in ("rms", "ln"), "norm must be 'rms' or 'ln'"),
            (self.act in ("gelu", "gelu_tanh"), "act must be 'gelu' or 'gelu_tanh'"),
            (0 <= self.clip_return_layers <= self.depth, "clip_return_layers must be in [0, depth]"),
            (0 <= self.mae_return_layers <= self.depth, "mae_return_layers must be in [0, depth]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"VisionConfig: {msg} (got {self})")
        return self


# Official shapes (FACTS 1.1). S/B/L are built like 1B; the official trains them by distillation from
# the stage-2 1B model (FACTS 1.10), here they are simply smaller students for the same recipe.
# The 6B's drop path is 0.3 (FACTS 1.8). The toy preset is sized for a 2-core CPU (ToyWorld: 32 px,
# 8 px patches, 16 patches per frame) and its heads match the toy teachers in teachers.py.
VISION_PRESETS = {
    "toy": VisionConfig(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0,
                        drop_path=0.0, pool_heads=4, pool_dim=96, clip_teacher_dim=96,
                        clip_teacher_final_dim=96, clip_return_layers=2, mae_teacher_dim=96,
                        mae_return_layers=2),
    "S": VisionConfig(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path=0.1),
    "B": VisionConfig(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path=0.1),
    "L": VisionConfig(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, drop_path=0.2),
    "1B": VisionConfig(),
    "6B": VisionConfig(embed_dim=3200, depth=48, num_heads=25, mlp_ratio=4.0, drop_path=0.3),
}


def vision_preset(name, **overrides):
    """Look up a preset by name (case-insensitive) and apply field overrides."""
    table = {k.lower(): v for k, v in VISION_PRESETS.items()}
    if name.lower() not in table:
        raise ValueError(f"unknown vision preset {name!r}; choose one of {list(VISION_PRESETS)}")
    return replace(table[name.lower()], **overrides).validate()


# ------------------------------------------------------------------------------------------------
# primitives

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as the official (weight only, no bias)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(kind, dim, eps=1e-6):
    return RMSNorm(dim, eps) if kind == "rms" else nn.LayerNorm(dim, eps=eps)


def split_heads(x, n_heads):       # (B, N, H*hd) -> (B, H, N, hd)
    B, N, _ = x.shape
    return x.view(B, N, n_heads, -1).transpose(1, 2)


def merge_heads(x):                # (B, H, N, hd) -> (B, N, H*hd)
    B, H, N, hd = x.shape
    return x.transpose(1, 2).reshape(B, N, H * hd)


def attend(q, k, v, mask=None, causal=False, dropout=0.0, need_weights=False):
    """The one attention of the project: softmax(q k^T / sqrt(hd)) v over head-split tensors.

    q: (B, H, Nq, hd); k, v: (B, Hkv, Nk, hd) with H a multiple of Hkv (grouped-query attention);
    mask: bool (B or 1, 1 or H, Nq or 1, Nk), True = may attend, or an additive float mask.
    Returns (B, H, Nq, hd), plus the head-averaged weights (B, Nq, Nk) when need_weights (an
    explicit softmax, used only by the small pooling query whose weights drive stage-1 masking).
    """
    if need_weights:
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        w = s.float().softmax(-1).to(v.dtype)
        return w @ v, w.mean(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    """Self-attention of the ViT family: one fused qkv Linear, optional q/v biases (VideoMAE),
    optional qk-norm over the full width (InternVideo2, InternViT; FACTS 6.1), output proj."""

    def __init__(self, dim, num_heads, qkv_bias="none", qk_norm=False, norm="rms"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)   # rows are [q; k; v] (FACTS 4.1)
        if qkv_bias == "qv":                             # VideoMAE: k has no bias (FACTS 1.4)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.q_norm = make_norm(norm, dim) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                # x: (B, N, D)
        bias = None
        if hasattr(self, "q_bias"):
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)  # 3 x (B, N, D)
        q, k = self.q_norm(q), self.k_norm(k)            # normalised with all heads concatenated
        h = self.num_heads
        y = attend(split_heads(q, h), split_heads(k, h), split_heads(v, h))
        return self.proj(merge_heads(y))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act="gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class LayerScale(nn.Module):
    """Per-channel residual gain, initialised small (1e-5 student, 0.1 InternViT); multiplied in fp32
    as the official does unless told otherwise (FACTS 1.2)."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return (x.float() * self.gamma.float()).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(LayerScale(sublayer(Norm(x)))) (FACTS 1.2)."""

    def __init__(self, cfg: VisionConfig, drop_path=0.0):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = make_norm(cfg.norm, d)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.norm)
        self.ls1 = LayerScale(d, cfg.layerscale) if cfg.layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = make_norm(cfg.norm, d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), cfg.act)
        self.ls2 = LayerScale(d, cfg.layerscale) if cfg.layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (tubelet, patch, patch): (B, 3, T, H, W) -> (B, T', H'W', D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        t, p = cfg.tubelet_size, cfg.patch_size
        self.proj = nn.Conv3d(3, cfg.embed_dim, kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, x):
        return self.proj(x).flatten(3).permute(0, 2, 3, 1)   # (B, D, T', H', W') -> (B, T', H'W', D)


class PoolCrossAttention(nn.Module):
    """The pooling block's attention: bias-free q/k/v Linears with separate bias vectors, as the
    official keys (`cross_attn.q.weight`, `cross_attn.q_bias`, ...), and a projection to out_dim."""

    def __init__(self, dim, num_heads, out_dim):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, xq, xk, xv, need_weights=False):  # xq: (B, 1, D); xk, xv: (B, N, D)
        h = self.num_heads
        q = split_heads(F.linear(xq, self.q.weight, self.q_bias), h)
        k = split_heads(F.linear(xk, self.k.weight, self.k_bias), h)
        v = split_heads(F.linear(xv, self.v.weight, self.v_bias), h)
        out = attend(q, k, v, need_weights=need_weights)
        y, w = out if need_weights else (out, None)
        return self.proj(merge_heads(y)), w                    # (B, 1, out_dim), (B, 1, N) or None


class AttentionPool(nn.Module):
    """`clip_projector`: one query = mean of all tokens (CLS included), LayerNorm'd separately for
    q, k and v (eps 1e-5), cross-attends to the tokens; no residual, no MLP (FACTS 1.2, 6.4).
    (B, N, D) -> (B, out_dim), and optionally the query's head-averaged attention (B, N)."""

    def __init__(self, dim, num_heads, out_dim):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.cross_attn = PoolCrossAttention(dim, num_heads, out_dim)

    def forward(self, x, need_weights=False):
        q = self.norm1_q(x.mean(1, keepdim=True))
        y, w = self.cross_attn(q, self.norm1_k(x), self.norm1_v(x), need_weights)
        return (y.squeeze(1), w.squeeze(1)) if need_weights else y.squeeze(1)


class LinearDecoder(nn.Module):
    """Stage-1 head: Linear -> LayerNorm(eps 1e-5) -> L2 normalise (official `Linear_Decoder`)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.head = nn.Linear(dim_in, dim_out)
        self.norm = nn.LayerNorm(dim_out, eps=1e-5)

    def forward(self, x):
        return F.normalize(self.norm(self.head(x)), dim=-1)


class MLPDecoder(nn.Module):
    """Stage-1 MAE head: Linear -> GELU (exact) -> Linear -> LayerNorm -> L2 (official `MLP_Decoder`;
    `head.1` is the GELU, so the Linears are `head.0` and `head.2` as in the checkpoint)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(dim_in, dim_in), nn.GELU(), nn.Linear(dim_in, dim_out))
        self.norm = nn.LayerNorm(dim_out, eps=1e-5)

    def forward(self, x):
        return F.normalize(self.norm(self.head(x)), dim=-1)


def gather_tokens(x, index):
    """Pick tokens by index along the token axis. x: (..., B, N, D), index: (B, Nv) -> (..., B, Nv, D).
    Used for the masked forward and for gathering teacher targets at the student's visible slots."""
    idx = index[..., None].expand(*index.shape, x.shape[-1])
    if x.ndim == 4:                                   # (K, B, N, D): the same slots for every layer
        idx = idx.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    return x.gather(-2, idx)


# ------------------------------------------------------------------------------------------------
# position tables

def sincos_1d(dim, pos):
    """[sin(pos * w), cos(pos * w)] with w_i = 10000^(-i / (dim/2)); pos: (M,) -> (M, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim, size):
    """(size*size, dim): first half encodes the column (w), second half the row (h); the official
    builds its meshgrid w-first (FACTS 1.2)."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


def sincos_3d(dim, size, t_size, cls_token=True):
    """(1 [+1], t*size*size, dim) float32: the first dim/4 channels encode time, the last 3*dim/4 space
    (sincos_2d); tokens in (t, h, w) order; the CLS row, when present, is zeros (FACTS 1.2)."""
    spatial = sincos_2d(dim // 4 * 3, size)                                  # (HW, 3D/4)
    temporal = sincos_1d(dim // 4, torch.arange(t_size))                     # (T, D/4)
    table = torch.cat([temporal[:, None].expand(-1, size * size, -1),
                       spatial[None].expand(t_size, -1, -1)], dim=-1).reshape(-1, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table])
    return table.float()[None]


def sinusoid_table(n_position, dim):
    """The transformer's 1-D table with interleaved channels (2i: sin, 2i+1: cos), as VideoMAE's fixed
    position embedding (FACTS 1.4): (1, n_position, dim)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (2 * (torch.arange(dim) // 2) / dim)
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return table.float()[None]


def interpolate_pos_embed_time(pos, t_old, t_new, cls_token=True):
    """Linear interpolation of a (1, [1+] T*HW, D) table in time, one spatial position at a time
    (the official stage-1 -> stage-2 hand-off, 8 -> 4 frames; FACTS 2.2, 4.4)."""
    if t_old == t_new:
        return pos
    cls, grid = (pos[:, :1], pos[:, 1:]) if cls_token else (pos[:, :0], pos)
    D = grid.shape[-1]
    hw = grid.shape[1] // t_old
    g = grid.reshape(1, t_old, hw, D).permute(0, 2, 3, 1).reshape(hw, D, t_old)      # (HW, D, T)
    g = F.interpolate(g.float(), size=t_new, mode="linear").to(pos.dtype)
    g = g.reshape(1, hw, D, t_new).permute(0, 3, 1, 2).reshape(1, t_new * hw, D)
    return torch.cat([cls, g], dim=1)


# ------------------------------------------------------------------------------------------------
# the InternVideo2 video encoder (the student of stage 1; the vision tower of stages 2 and 3)

class InternVideo2(nn.Module):
    """InternVideo2 ViT (FACTS 1.2). Built `with_heads=True` it is the whole stage-1 pre-training
    module (encoder + CLIP/MAE decoders + their position tables), with the official key names."""

    def __init__(self, cfg: VisionConfig, with_heads=False):
        super().__init__()
        self.cfg = cfg.validate()
        D, N = cfg.embed_dim, cfg.num_patches
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, dpr[i]) for i in range(cfg.depth))
        self.clip_projector = AttentionPool(D, cfg.pool_heads, cfg.pool_dim)
        self.with_heads = with_heads
        if with_heads:                                       # FACTS 1.6, table
            self.clip_pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
            self.mae_pos_embed = nn.Parameter(torch.zeros(1, N, D))
            self.clip_decoder = nn.ModuleList(LinearDecoder(D, cfg.clip_teacher_dim)
                                              for _ in range(cfg.clip_return_layers))
            self.final_clip_decoder = (LinearDecoder(cfg.pool_dim, cfg.clip_teacher_final_dim)
                                       if cfg.clip_teacher_final_dim else nn.Identity())
            self.mae_decoder = nn.ModuleList(MLPDecoder(D, cfg.mae_teacher_dim)
                                             for _ in range(cfg.mae_return_layers))
        self.grad_ckpt_blocks = 0        # activation checkpointing for the first n blocks (runtime)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Linear weights trunc_normal(0.02), biases 0; LayerNorm (1, 0); Conv3d PyTorch default;
        cls trunc_normal(0.02); every position table from the 3-D sin-cos (CLS row zeros); then
        block l's attn.proj and mlp.fc2 weights / sqrt(2 l) (FACTS 1.2, 6.21). The decoders end up
        trunc-normal too: the official global init runs after their own Xavier init."""
        if self.pos_embed.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        t, h, _ = self.cfg.grid
        table = sincos_3d(self.cfg.embed_dim, h, t, cls_token=True)
        self.pos_embed.copy_(table)
        if self.with_heads:
            self.clip_pos_embed.copy_(table)
            self.mae_pos_embed.copy_(table[:, 1:])
        for layer_id, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def no_weight_decay(self):
        """Parameter names excluded from weight decay besides 1-D tensors and biases (FACTS 1.8)."""
        return {"pos_embed", "cls_token", "clip_pos_embed", "mae_pos_embed"}

    def forward_features(self, video, visible=None, layers=(), stop_after=None):
        """video: (B, 3, T, H, W) normalised frames.
        visible: (B, Nv) long indices into the 1+N tokens, CLS (index 0) first, or None for all.
        layers: block indices whose outputs to return; stop_after: last block to run (stage 3 reads
        the penultimate block). Returns x (B, Nv, D), the raw residual stream (no final norm), and
        {block index: (B, Nv, D)}."""
        B = video.shape[0]
        x = self.patch_embed(video).flatten(1, 2)                       # (B, N, D), (t, h, w) order
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)     # (B, 1+N, D)
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"video gives {x.shape[1] - 1} patches but the model was built for "
                             f"{self.cfg.num_patches} (num_frames={self.cfg.num_frames}, "
                             f"img_size={self.cfg.img_size}); got input {tuple(video.shape)}")
        x = x + self.pos_embed                                          # position first, then mask
        if visible is not None:
            x = gather_tokens(x, visible)                               # (B, Nv, D)
        hidden = {}
        last = len(self.blocks) - 1 if stop_after is None else stop_after
        for i, blk in enumerate(self.blocks[:last + 1]):
            if i < self.grad_ckpt_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in layers:
                hidden[i] = x
        return x, hidden

    def forward(self, video, visible=None, distill=False):
        """The pooled clip embedding (B, pool_dim); with distill=True the stage-1 outputs of
        forward_distill (routed through forward so that a DDP wrapper sees the call)."""
        if distill:
            return self.forward_distill(video, visible)
        return self.clip_projector(self.forward_features(video, visible)[0])

    def forward_distill(self, video, visible):
        """Stage-1 student outputs at the visible slots, every one L2-normalised (FACTS 1.6, 1.9):
        clip (Kc, B, Nv, clip_teacher_dim) from the last Kc blocks, CLS included;
        clip_final (B, clip_teacher_final_dim) from the pooled vector;
        mae (Km, B, Nv-1, mae_teacher_dim) from the last Km blocks, CLS excluded."""
        if not self.with_heads:
            raise RuntimeError("forward_distill needs the stage-1 heads: build InternVideo2(cfg, with_heads=True)")
        cfg, B, depth = self.cfg, video.shape[0], self.cfg.depth
        clip_layers = list(range(depth - cfg.clip_return_layers, depth))
        mae_layers = list(range(depth - cfg.mae_return_layers, depth))
        x, hidden = self.forward_features(video, visible, layers=set(clip_layers + mae_layers))
        pooled = self.clip_projector(x)
        clip_pos = gather_tokens(self.clip_pos_embed.expand(B, -1, -1), visible)         # (B, Nv, D)
        mae_pos = gather_tokens(self.mae_pos_embed.expand(B, -1, -1), visible[:, 1:] - 1)  # no CLS row
        out = {"clip_final": self.final_clip_decoder(pooled)}
        if clip_layers:
            out["clip"] = torch.stack([dec(hidden[i] + clip_pos)
                                       for dec, i in zip(self.clip_decoder, clip_layers)])
        if mae_layers:
            out["mae"] = torch.stack([dec(hidden[i][:, 1:] + mae_pos)
                                      for dec, i in zip(self.mae_decoder, mae_layers)])
        return out


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_table(model):
    """One line per top-level child: total and trainable parameters (nanoGPT-style, per component)."""
    rows = []
    for name, child in model.named_children():
        rows.append(f"  {name:<20} {count_params(child) / 1e6:10.2f}M  trainable "
                    f"{count_params(child, True) / 1e6:10.2f}M")
    direct = sum(p.numel() for n, p in model.named_parameters(recurse=False))
    rows.append(f"  {'(own parameters)':<20} {direct / 1e6:10.2f}M")
    rows.append(f"  {'total':<20} {count_params(model) / 1e6:10.2f}M")
    return "\n".join(rows)


if __name__ == "__main__":
    with torch.device("meta"):
        for name in VISION_PRESETS:
            enc = InternVideo2(vision_preset(name))
            full = InternVideo2(vision_preset(name), with_heads=True)
            print(f"{name:>4}: encoder {count_params(enc) / 1e6:9.1f}M | "
                  f"with stage-1 heads {count_params(full) / 1e6:9.1f}M")
