"""model.py: every network of nano-InternVideo2, in one file, plain PyTorch.

Read top to bottom:
  configs and presets   VisionConfig + VISION_PRESETS (toy, S, B, L, 1B, 6B; SM/models/internvideo2_pretrain.py:747-766)
  primitives            RMSNorm, attend() (the one attention, on F.scaled_dot_product_attention),
                        Attention, Mlp, LayerScale, DropPath, Block, PatchEmbed, AttentionPool
  position tables       3-D sin-cos (SM/models/pos_embed.py:9-54), 1-D sinusoid (VideoMAE), temporal interpolation
  token layout, masks   attention-guided, tube and random masking over CLS + t * Np + p tokens
  video encoder         InternVideo2: tubelet embedding, CLS, learnable pos-embed, pre-norm blocks
                        with RMSNorm + qk-norm + LayerScale, no final norm, attention-pooling head,
                        a masked forward over visible tokens only, and the stage-1 distillation heads.
  text encoder          BERT split into text layers and fusion layers (cross-attention), MLM head
                        (TEXT_PRESETS toy, bert-base, bert-large; MM/models/backbones/bert/xbert.py:599-611, 721-735)
  audio encoder         BEATs: fbank patches, conv position embedding, deep-norm post-LN layers with gated relative
                        position bias (AUDIO_PRESETS toy, beats-base; MM/models/backbones/beats/backbone.py:198-452)
  stage-2 model         projections, AV fusion, ITM heads, temp (MM/models/internvideo2_stage2_audiovisual.py:47-75)
  Q-Former              learned queries, cross-attention to the video every 2nd layer (VC2/models/blip2/blip2.py:53-69)
  LLM                   LLaMA/Mistral: RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache, LoRA
  stage-3 model         ViT -> Q-Former -> Linear -> LLM (VC2/models/videochat_mistra/videochat2_it_mistral.py:175-256)

How InternVideo2 differs from a textbook ViT (official source after each point):
  * qk-norm is ONE RMSNorm over the full width (all heads), not per head (SM/models/internvideo2_pretrain.py:169-181);
  * there is no final norm: features are the raw residual stream (SM/models/internvideo2_pretrain.py:685-690);
  * the MLP uses tanh-approximate GELU (the official fused MLP's default; SM/models/internvideo2_pretrain.py:268-269);
  * the pooled vector comes from an attention-pooling block whose query is the mean of ALL tokens
    (CLS included), with separate LayerNorms for q, k and v and no residual (SM/models/internvideo2_pretrain.py:98-114);
  * masked forward: add pos_embed, keep the visible tokens (CLS always; SM/models/internvideo2_pretrain.py:656-659).

Module and parameter names follow the official checkpoint keys (SM/models/internvideo2_pretrain.py:471-553), so an
official state dict loads with `load_state_dict` and no mapping table.

    python model.py            # prints the parameter table of every preset (meta device, instant)
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


# ------------------------------------------------------------------------------------------------
# configs and presets

@dataclass
class VisionConfig:
    """A ViT over video. The same dataclass describes the student and both teachers (teachers.py)."""
    img_size: int = 224
    patch_size: int = 14
    num_frames: int = 8            # frames the network sees (student: 8 in stage 1, SM/run_pretraining.py:238)
    tubelet_size: int = 1          # frames per Conv3d patch (student 1, VideoMAE teacher 2)
    dim: int = 1408                # width
    depth: int = 40
    heads: int = 16
    mlp_dim: int = 6144            # MLP width: int(1408 * 48 / 11) for 1B (SM/models/internvideo2_pretrain.py:267)
    qkv_bias: str = "none"         # "none" (InternVideo2, InternViT) | "qv" (VideoMAE: q and v only)
    qk_norm: bool = True           # RMSNorm over the full width on q and k (SM/models/internvideo2_pretrain.py:169-181)
    norm: str = "rms"              # "rms" (eps 1e-6) | "ln" (VideoMAE, eps 1e-6)
    layerscale: float = 1e-5       # LayerScale init; 0 = no LayerScale (SM/models/internvideo2_pretrain.py:261-262)
    act: str = "gelu_tanh"         # "gelu_tanh" (official fused MLP) | "gelu" (exact, VideoMAE)
    drop_path: float = 0.25        # last block's drop path, linear from 0 (SM/models/internvideo2_pretrain.py:502)
    pool_heads: int = 16           # attention-pooling head (clip_projector)
    pool_dim: int = 768            # its output width (clip_embed_dim)
    # stage-1 distillation heads (SM/models/internvideo2_pretrain.py:527-553), only when the model is built with heads
    clip_teacher_dim: int = 3200   # InternViT-6B token width
    clip_teacher_final_dim: int = 768  # InternViT-6B pooled width; 0 = no final-feature head
    clip_return_layers: int = 6    # last K blocks aligned to the image teacher
    mae_teacher_dim: int = 1408    # VideoMAEv2-g token width
    mae_return_layers: int = 4     # last K blocks aligned to the video teacher

    @classmethod
    def from_saved(cls, saved):
        """The config a checkpoint recorded (its model_config dict). Checkpoints written before the video teacher's
        attention moved to teachers.py (2026-12-07) also hold attention_layout="standard", which is dropped."""
        return cls(**{k: v for k, v in saved.items() if k != "attention_layout"})

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
            (self.dim % self.heads == 0, "dim must be divisible by heads"),
            (self.dim % self.pool_heads == 0, "dim must be divisible by pool_heads"),
            (self.dim % 16 == 0, "dim must be a multiple of 16 (3-D sin-cos table)"),
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


# Official shapes (SM/models/internvideo2.py:546-576; SM/models/internvideo2_pretrain.py:747-766). S/B/L are
# built like 1B; the official distils them from the stage-2 1B model (SM/README.md:47-61), here they
# are simply smaller students for the same recipe. The 6B drop path is 0.3 (SM/scripts/pretraining/6B_pt.sh:46). The
# toy preset fits a 2-core CPU (ToyWorld: 32 px, 8 px patches, 16 patches per frame); its heads match the toy teachers.
# It has no LayerScale: started at 1e-5, its four blocks still add only a few per cent to the residual stream after
# 1200 CPU steps, and the video-teacher term never leaves its plateau (results/toyworld_motion.md).
VISION_PRESETS = {
    "toy": VisionConfig(img_size=32, patch_size=8, dim=96, depth=4, heads=4, mlp_dim=384, layerscale=0.0, drop_path=0.0,
                        pool_heads=4, pool_dim=96, clip_teacher_dim=96, clip_teacher_final_dim=96, clip_return_layers=2,
                        mae_teacher_dim=96, mae_return_layers=2),
    "S": VisionConfig(dim=384, depth=12, heads=6, mlp_dim=1536, drop_path=0.1),
    "B": VisionConfig(dim=768, depth=12, heads=12, mlp_dim=3072, drop_path=0.1),
    "L": VisionConfig(dim=1024, depth=24, heads=16, mlp_dim=4096, drop_path=0.2),
    "1B": VisionConfig(),
    "6B": VisionConfig(dim=3200, depth=48, heads=25, mlp_dim=12800, drop_path=0.3),
}


def preset(table, name, kind, **overrides):
    """The one preset lookup (vision, text, audio, teachers): by name, case-insensitive, with field
    overrides, validated when the config can validate itself."""
    by_name = {k.lower(): v for k, v in table.items()}
    if name.lower() not in by_name:
        raise ValueError(f"unknown {kind} preset {name!r}; choose one of {list(table)}")
    cfg = replace(by_name[name.lower()], **overrides)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def vision_preset(name, **overrides):
    return preset(VISION_PRESETS, name, "vision", **overrides)


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
    explicit softmax: the pooling query whose weights drive stage-1 masking, and the notebooks' pictures).
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
    """Self-attention of the ViT family: one fused qkv Linear, output proj, optional q/v biases (VideoMAE),
    optional qk-norm over the full width (InternVideo2, InternViT; SM/models/internvideo2_pretrain.py:169-181)."""

    def __init__(self, dim, heads, qkv_bias="none", qk_norm=False, norm="rms"):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)   # rows are [q; k; v] (SM/models/internvideo2_pretrain.py:196)
        if qkv_bias == "qv":                             # VideoMAE: k has no bias (SM/models/videomae.py:74-92)
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.q_norm = make_norm(norm, dim) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def heads_qkv(self, x):                              # x: (B, N, D) -> q, k, v: (B, H, N, hd) each
        qkv = self.qkv(x)                                # (B, N, 3D)
        if hasattr(self, "q_bias"):
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = qkv.chunk(3, dim=-1)                   # 3 x (B, N, D)
        q, k = self.q_norm(q), self.k_norm(k)            # normalised with all heads concatenated
        h = self.heads
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)

    def forward(self, x):                                # x: (B, N, D)
        return self.proj(merge_heads(attend(*self.heads_qkv(x))))


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
    as the official does unless told otherwise (SM/models/internvideo2_pretrain.py:131-146, 261-262)."""

    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x):
        return (x.float() * self.gamma.float()).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training. The rate is a
    buffer, not a Python float: torch.compile guards on float attributes, so 40 blocks with 40
    rates would compile 40 graphs instead of sharing one (common.compile_blocks)."""

    def __init__(self, p):
        super().__init__()
        self.enabled = p > 0
        self.register_buffer("p", torch.tensor(float(p)), persistent=False)

    def forward(self, x):
        if not self.training or not self.enabled:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm ViT block: x + DropPath(LayerScale(sublayer(Norm(x)))) (SM/models/internvideo2_pretrain.py:290-291)."""

    def __init__(self, cfg: VisionConfig, drop_path=0.0, attention=Attention):
        super().__init__()
        d = cfg.dim
        self.norm1 = make_norm(cfg.norm, d)
        # attention: Attention, or a subclass computing it otherwise (the released video teacher's, teachers.py)
        self.attn = attention(d, cfg.heads, cfg.qkv_bias, cfg.qk_norm, cfg.norm)
        self.ls1 = LayerScale(d, cfg.layerscale) if cfg.layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = make_norm(cfg.norm, d)
        self.mlp = Mlp(d, cfg.mlp_dim, cfg.act)
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
        self.proj = nn.Conv3d(3, cfg.dim, kernel_size=(t, p, p), stride=(t, p, p))

    def forward(self, x):
        return self.proj(x).flatten(3).permute(0, 2, 3, 1)   # (B, D, T', H', W') -> (B, T', H'W', D)


class PoolCrossAttention(nn.Module):
    """The pooling block's attention: bias-free q/k/v Linears with separate bias vectors, as the
    official keys (`cross_attn.q.weight`, `cross_attn.q_bias`, ...), and a projection to out_dim."""

    def __init__(self, dim, heads, out_dim):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(dim)) for _ in range(3))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, xq, xk, xv, need_weights=False):  # xq: (B, 1, D); xk, xv: (B, N, D)
        h = self.heads
        q = split_heads(self.q(xq) + self.q_bias, h)
        k = split_heads(self.k(xk) + self.k_bias, h)
        v = split_heads(self.v(xv) + self.v_bias, h)
        out = attend(q, k, v, need_weights=need_weights)
        y, w = out if need_weights else (out, None)
        return self.proj(merge_heads(y)), w                    # (B, 1, out_dim), (B, 1, N) or None


class AttentionPool(nn.Module):
    """`clip_projector`: one query = mean of all tokens (CLS included), LayerNorm'd separately for
    q, k and v (eps 1e-5), cross-attends to the tokens; no residual, no MLP (SM/models/internvideo2_pretrain.py:98-114).
    (B, N, D) -> (B, out_dim), and optionally the query's head-averaged attention (B, N)."""

    def __init__(self, dim, heads, out_dim):
        super().__init__()
        self.norm1_q, self.norm1_k, self.norm1_v = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))
        self.cross_attn = PoolCrossAttention(dim, heads, out_dim)

    def forward(self, x, need_weights=False):
        q = self.norm1_q(x.mean(1, keepdim=True))
        y, w = self.cross_attn(q, self.norm1_k(x), self.norm1_v(x), need_weights)
        return (y.squeeze(1), w.squeeze(1)) if need_weights else y.squeeze(1)


class Decoder(nn.Module):
    """Stage-1 head: head -> LayerNorm(eps 1e-5) -> L2 normalise. The head is a Linear for the image
    teacher (official `Linear_Decoder`), Linear -> GELU (exact) -> Linear for the video teacher
    (`MLP_Decoder`; `head.1` is the GELU, so the Linears are `head.0` and `head.2` as in the checkpoint)."""

    def __init__(self, dim_in, dim_out, mlp=False):
        super().__init__()
        self.head = (nn.Sequential(nn.Linear(dim_in, dim_in), nn.GELU(), nn.Linear(dim_in, dim_out)) if mlp
                     else nn.Linear(dim_in, dim_out))
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
    builds its meshgrid w-first (SM/models/pos_embed.py:21-24, 98-110)."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)


def sincos_3d(dim, size, t_size, cls_token=True):
    """(1 [+1], t*size*size, dim) float32: the first dim/4 channels encode time, the last 3*dim/4 space
    (sincos_2d); tokens in (t, h, w) order; the CLS row, when present, is zeros (SM/models/pos_embed.py:9-54)."""
    spatial = sincos_2d(dim // 4 * 3, size)                                  # (HW, 3D/4)
    temporal = sincos_1d(dim // 4, torch.arange(t_size))                     # (T, D/4)
    table = torch.cat([temporal[:, None].expand(-1, size * size, -1),
                       spatial[None].expand(t_size, -1, -1)], dim=-1).reshape(-1, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table])
    return table.float()[None]


def sinusoid_table(n_position, dim):
    """The transformer's 1-D table with interleaved channels (2i: sin, 2i+1: cos), as VideoMAE's fixed
    position embedding (SM/models/videomae.py:160-204): (1, n_position, dim). Computed in float64 throughout, as
    the official numpy table (in float32 the exponent alone puts the 1408-wide table 8e-5 off), then stored as float32."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)
    table = torch.where(torch.arange(dim) % 2 == 0, angle.sin(), angle.cos())
    return table.float()[None]


def interpolate_pos_embed_time(pos, t_old, t_new, cls_token=True):
    """Linear interpolation of a (1, [1+] T*HW, D) table in time, one spatial position at a time
    (the official stage-1 -> stage-2 hand-off, 8 -> 4 frames; MM/models/backbones/internvideo2/pos_embed.py:185-233)."""
    if t_old == t_new:
        return pos
    cls, grid = (pos[:, :1], pos[:, 1:]) if cls_token else (pos[:, :0], pos)
    g = rearrange(grid, "1 (t n) d -> n d t", t=t_old)                               # (HW, D, T)
    g = F.interpolate(g.float(), size=t_new, mode="linear").to(pos.dtype)
    return torch.cat([cls, rearrange(g, "n d t -> 1 (t n) d")], dim=1)


# ------------------------------------------------------------------------------------------------
# the token layout and the masks (SM/engines/engine_for_pretraining.py:105-116). The encoder's tokens are CLS at index
# 0, then patch (t, p) at 1 + t * Np + p: (t, h, w) order, Np patches per frame. A mask is the sorted index of the
# tokens the student sees, visible (B, 1 + n): CLS first, then the kept patches in ascending order.
# Every generator turns per-sample uniform noise (B, T', Np) into that index, keeping
# Np - floor(ratio * Np) patches per frame: 52 of 256 at 0.8 (1 + 8 * 52 = 417 tokens).

def _visible_from_keys(keys, ratio):
    """keys: (B, T', Np), larger = keep. Keep the top n per frame; -> (B, 1 + T' * n) sorted."""
    B, T, Np = keys.shape
    n_vis = Np - int(ratio * Np)
    keep = keys.topk(n_vis, dim=-1).indices.sort(-1).values               # (B, T', n)
    keep = keep + torch.arange(T, device=keys.device)[None, :, None] * Np + 1
    cls = torch.zeros(B, 1, dtype=keep.dtype, device=keep.device)
    return torch.cat([cls, keep.flatten(1)], dim=1)


def attention_mask(attn, noise, ratio=0.8):
    """Attention-guided masking, the official stage-1 default (SM/engines/engine_for_pretraining.py:105-116): per frame,
    order the patches by weighted sampling WITHOUT replacement with probabilities proportional to the image
    teacher's pooling attention, and keep the first Np - floor(ratio * Np).

    attn: (B*T' or B, T', Np) non-negative weights; noise: (B, T', Np) uniform in (0, 1).
    The official calls torch.multinomial(attn, Np). The same distribution comes from exponential
    keys u^(1/w) (Efraimidis & Spirakis, 2006): the top-n keys are a weighted sample without
    replacement. No host sync, and the noise is the sample's own (seeded by the loader), so masks
    do not depend on world size or workers. tests/test_model.py checks the first-pick probabilities."""
    B, T, Np = noise.shape
    w = attn.reshape(B, T, Np).float().clamp_min(1e-12)
    keys = torch.log(noise.clamp_min(1e-12)) / w                           # log(u^(1/w)), monotone
    return _visible_from_keys(keys, ratio)


def tube_mask(noise, ratio=0.8):
    """Tube masking: one random spatial mask per clip (official crashes: SM/engines/engine_for_pretraining.py:106)."""
    return _visible_from_keys(noise[:, :1].expand_as(noise), ratio)


def random_mask(noise, ratio=0.8):
    """Random masking over the whole clip, N - floor(ratio * N) visible (the official stage-2
    generator, MM/models/mask.py:22-37: 1024 patches at 0.8 -> 205 visible + CLS)."""
    return _visible_from_keys(noise.flatten(1)[:, None], ratio)


MASK_TYPES = ("attention", "tube", "random")


def make_mask(mask_type, noise, ratio, attn=None):
    """visible (B, 1 + n) by name; attention masking needs the image teacher's attn."""
    if mask_type == "attention":
        return attention_mask(attn, noise, ratio)
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    return (tube_mask if mask_type == "tube" else random_mask)(noise, ratio)


def patch_index(visible):
    """visible (B, 1 + n) token index -> (B, n) index into the N patch tokens alone (CLS dropped, every
    index shifted down by one): the slots of a table or teacher with no CLS row."""
    return visible[:, 1:] - 1


# ------------------------------------------------------------------------------------------------
# the InternVideo2 video encoder (the student of stage 1; the vision tower of stages 2 and 3)

class InternVideo2(nn.Module):
    """InternVideo2 ViT (SM/models/internvideo2_pretrain.py:406-744). Built `with_heads=True` it is the whole stage-1
    pre-training module (encoder + CLIP/MAE decoders + their position tables), with the official key names."""

    def __init__(self, cfg: VisionConfig, with_heads=False):
        super().__init__()
        self.cfg = cfg.validate()
        D, N = cfg.dim, cfg.num_patches
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, dpr[i]) for i in range(cfg.depth))
        self.clip_projector = AttentionPool(D, cfg.pool_heads, cfg.pool_dim)
        self.with_heads = with_heads
        if with_heads:                                       # SM/models/internvideo2_pretrain.py:498-553
            self.clip_pos_embed = nn.Parameter(torch.zeros(1, N + 1, D))
            self.mae_pos_embed = nn.Parameter(torch.zeros(1, N, D))
            self.clip_decoder = nn.ModuleList(Decoder(D, cfg.clip_teacher_dim)
                                              for _ in range(cfg.clip_return_layers))
            self.final_clip_decoder = (Decoder(cfg.pool_dim, cfg.clip_teacher_final_dim)
                                       if cfg.clip_teacher_final_dim else nn.Identity())
            self.mae_decoder = nn.ModuleList(Decoder(D, cfg.mae_teacher_dim, mlp=True)
                                             for _ in range(cfg.mae_return_layers))
        self.grad_ckpt_blocks = 0        # activation checkpointing for the first n blocks (runtime)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Linear weights trunc_normal(0.02), biases 0; LayerNorm (1, 0); Conv3d PyTorch default;
        cls trunc_normal(0.02); every position table from the 3-D sin-cos (CLS row zeros); then
        block l's attn.proj and mlp.fc2 weights / sqrt(2 l) (SM/models/internvideo2_pretrain.py:555-603). The decoders
        end up trunc-normal too: the official global init runs after their own Xavier init."""
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
        table = sincos_3d(self.cfg.dim, h, t, cls_token=True)
        self.pos_embed.copy_(table)
        if self.with_heads:
            self.clip_pos_embed.copy_(table)
            self.mae_pos_embed.copy_(table[:, 1:])
        for layer_id, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def set_num_frames(self, t):
        """Resize the position table in time for t frames (linear interpolation, as the official hand-offs
        do: MM/models/backbones/internvideo2/pos_embed.py:137-233). A new Parameter: rebuild the optimizer."""
        if t == self.cfg.num_frames:
            return
        if self.with_heads:
            raise RuntimeError("set_num_frames is for the encoder without its stage-1 heads")
        tub = self.cfg.tubelet_size
        self.pos_embed = nn.Parameter(interpolate_pos_embed_time(self.pos_embed.data, self.cfg.grid[0], t // tub))
        self.cfg = replace(self.cfg, num_frames=t).validate()

    def no_weight_decay(self):
        """No-weight-decay names besides 1-D tensors and biases (SM/models/internvideo2_pretrain.py:612-627)."""
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

    def forward(self, video, visible=None):
        """The pooled clip embedding (B, pool_dim)."""
        return self.clip_projector(self.forward_features(video, visible)[0])

    def forward_distill(self, video, visible):
        """Stage-1 student outputs at the visible slots, all L2-normalised (SM/models/internvideo2_pretrain.py:669-744):
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
        mae_pos = gather_tokens(self.mae_pos_embed.expand(B, -1, -1), patch_index(visible))  # no CLS row
        out = {"clip_final": self.final_clip_decoder(pooled)}
        if clip_layers:
            out["clip"] = torch.stack([dec(hidden[i] + clip_pos)
                                       for dec, i in zip(self.clip_decoder, clip_layers)])
        if mae_layers:
            out["mae"] = torch.stack([dec(hidden[i][:, 1:] + mae_pos)
                                      for dec, i in zip(self.mae_decoder, mae_layers)])
        return out


# ------------------------------------------------------------------------------------------------
# text encoder: BERT split into text layers and fusion layers (MM/models/backbones/bert/xbert.py:599-611, 721-735)

@dataclass
class TextConfig:
    vocab_size: int = 30522
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    max_len: int = 512             # position-embedding rows
    fusion_layer: int = 19         # layers [0, 19) are text-only; [19, 24) add cross-attention
    cross_width: int = 1408        # K/V input width of cross-attention = the memory's width
    dropout: float = 0.1           # hidden and attention dropout
    eps: float = 1e-12             # LayerNorm eps (post-LN everywhere)
    init_std: float = 0.02         # BERT's init; the toy's width gets the same relative scale (0.02 ~ 0.6/sqrt(1024))


TEXT_PRESETS = {
    "toy": TextConfig(vocab_size=0, dim=96, depth=4, heads=4, mlp_dim=384, max_len=64, fusion_layer=3,
                      cross_width=96, dropout=0.0, init_std=0.06),   # vocab_size comes from the ToyWorld vocabulary
    "bert-base": TextConfig(dim=768, depth=12, heads=12, mlp_dim=3072, fusion_layer=9),
    "bert-large": TextConfig(),
}


def text_preset(name, **overrides):
    return preset(TEXT_PRESETS, name, "text", **overrides)


class BertAttention(nn.Module):
    """BERT attention: q/k/v/o Linears with biases; for cross-attention k and v read a memory of
    width kv_dim (the vision or audio+vision tokens)."""

    def __init__(self, dim, heads, kv_dim=None, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(kv_dim or dim, dim), nn.Linear(kv_dim or dim, dim)

    def forward(self, x, memory=None, mask=None, need_weights=False):
        """-> (B, N, dim); with need_weights also the head-averaged weights (B, N, Nk) (notebooks' pictures)."""
        kv = x if memory is None else memory
        h = self.heads
        y = attend(split_heads(self.q(x), h), split_heads(self.k(kv), h), split_heads(self.v(kv), h), mask=mask,
                   dropout=self.dropout if self.training else 0.0, need_weights=need_weights)
        if need_weights:
            return self.o(merge_heads(y[0])), y[1]
        return self.o(merge_heads(y))


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + SelfAttn(x)); [x = LN(x + CrossAttn(x, memory))]; x = LN(x + FFN(x))."""

    def __init__(self, cfg: TextConfig, cross):
        super().__init__()
        H = cfg.dim
        self.attn = BertAttention(H, cfg.heads, dropout=cfg.dropout)
        self.attn_norm = nn.LayerNorm(H, eps=cfg.eps)
        if cross:
            self.cross = BertAttention(H, cfg.heads, kv_dim=cfg.cross_width, dropout=cfg.dropout)
            self.cross_norm = nn.LayerNorm(H, eps=cfg.eps)
        self.fc1, self.fc2 = nn.Linear(H, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, H)
        self.ffn_norm = nn.LayerNorm(H, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, memory=None, memory_mask=None):
        x = self.attn_norm(x + self.drop(self.attn(x, mask=mask)))
        if memory is not None:
            x = self.cross_norm(x + self.drop(self.cross(x, memory, memory_mask)))
        return self.ffn_norm(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))  # erf: MM/configs/config_bert_large.json:7


class TextEncoder(nn.Module):
    """BERT with an MLM head tied to the word embeddings. `forward_text` runs the text layers only
    (the contrastive text feature is its [CLS] state, MM/models/internvideo2_stage2_visual.py:281-288); `forward_fusion`
    runs the fusion layers over given token states with cross-attention to a memory. causal=True makes every
    self-attention causal (the autoregressive variant of the third loss)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("TextConfig.vocab_size must be set (from the tokenizer's vocabulary)")
        self.cfg = cfg
        H = cfg.dim
        self.word_emb = nn.Embedding(cfg.vocab_size, H)
        self.pos_emb = nn.Embedding(cfg.max_len, H)
        self.type_emb = nn.Embedding(2, H)
        self.emb_norm = nn.LayerNorm(H, eps=cfg.eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(BertLayer(cfg, cross=i >= cfg.fusion_layer) for i in range(cfg.depth))
        self.mlm_dense, self.mlm_norm = nn.Linear(H, H), nn.LayerNorm(H, eps=cfg.eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        for m in self.modules():                           # BERT init: N(0, 0.02), biases 0, LN (1, 0)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _mask(pad_mask, causal):
        """(B, L) 1 = token, 0 = pad -> bool (B, 1, L or 1, L), True = may attend. Padded query rows
        are still computed, as the official."""
        m = pad_mask.bool()[:, None, None, :]
        if causal:
            L = pad_mask.shape[1]
            m = m & torch.ones(L, L, dtype=torch.bool, device=pad_mask.device).tril()
        return m

    def forward_text(self, ids, pad_mask, causal=False):
        """ids, pad_mask: (B, L) -> states after the text layers (B, L, H)."""
        L = ids.shape[1]
        if L > self.cfg.max_len:
            raise ValueError(f"text of {L} tokens exceeds max_len {self.cfg.max_len}")
        pos = torch.arange(L, device=ids.device)
        x = self.word_emb(ids) + self.pos_emb(pos)[None] + self.type_emb.weight[0]
        x = self.drop(self.emb_norm(x))
        mask = self._mask(pad_mask, causal)
        for layer in self.layers[:self.cfg.fusion_layer]:
            x = layer(x, mask)
        return x

    def forward_fusion(self, x, pad_mask, memory, memory_mask=None, causal=False):
        """x: (B, L, H) text states; memory: (B, M, cross_width) -> (B, L, H) after the fusion layers.
        memory=None runs them as plain BERT layers (text-only pre-training, as bert-*-uncased was)."""
        mask = self._mask(pad_mask, causal)
        mem_mask = None if memory_mask is None else memory_mask.bool()[:, None, None, :]
        for layer in self.layers[self.cfg.fusion_layer:]:
            x = layer(x, mask, memory, mem_mask)
        return x

    def mlm_logits(self, x):
        """(B, L, H) -> (B, L, vocab): transform (dense, GELU, LN), then the tied decoder + bias."""
        return F.linear(self.mlm_norm(F.gelu(self.mlm_dense(x))), self.word_emb.weight, self.mlm_bias)


# ------------------------------------------------------------------------------------------------
# audio encoder: BEATs (MM/models/backbones/beats/BEATs.py:142-162; MM/models/backbones/beats/backbone.py:391-452)

@dataclass
class AudioConfig:
    mel_bins: int = 64             # InternVideo2 feeds 64-bin fbanks, not BEATs' own 128 (MM/dataset/av_utils.py:116)
    frames: int = 998              # fbank frames after padding (10 s at a 10 ms shift)
    patch: int = 16                # Conv2d kernel = stride over (frames, mel): 998 x 64 -> 62 x 4 = 248 tokens
    patch_dim: int = 512           # patch-embedding width
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pos_conv: int = 128            # convolutional position embedding kernel and groups
    pos_conv_groups: int = 16
    deep_norm: bool = True         # post-LN with residual gain (2 L)^(1/4)
    num_buckets: int = 320         # relative position bias (T5 buckets), shared from layer 0
    max_distance: int = 800
    gru_rel_pos: bool = True       # gated relative position bias
    dropout: float = 0.1           # frozen, still in train mode (MM/models/internvideo2_stage2_audiovisual.py:119-122)


# beats-base: the released BEATs iter3 checkpoints' cfg as far as known; load_beats reads the
# checkpoint's own cfg when present (its values are not verifiable from the official code).
AUDIO_PRESETS = {
    "toy": AudioConfig(frames=96, patch_dim=64, dim=96, depth=2, heads=4, mlp_dim=384, pos_conv=16, pos_conv_groups=4,
                       num_buckets=32, max_distance=64, dropout=0.0),
    "beats-base": AudioConfig(),
}


def audio_preset(name, **overrides):
    return preset(AUDIO_PRESETS, name, "audio", **overrides)


class PosConv(nn.Module):
    """Grouped Conv1d under weight norm over the kernel axis (one norm per tap: weight_g (1, 1, K)),
    "same" padding that drops the last step for even kernels, then GELU."""

    def __init__(self, dim, kernel, groups):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_v = nn.Parameter(torch.randn(dim, dim // groups, kernel) * math.sqrt(4 / (kernel * dim)))
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):                                  # (B, N, D) -> (B, N, D)
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)
        y = F.conv1d(x.transpose(1, 2), w, self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[..., :-1]
        return F.gelu(y).transpose(1, 2)


class BeatsAttention(nn.Module):
    """Self-attention with BEATs' (optionally gated) relative position bias added to the logits."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        D = cfg.dim
        self.heads, self.gated, self.dropout = cfg.heads, cfg.gru_rel_pos, cfg.dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(D // cfg.heads, 8)
            self.grep_a = nn.Parameter(torch.ones(1, cfg.heads, 1, 1))

    def forward(self, x, pos_bias):                        # x: (B, N, D); pos_bias: (H, N, N) or None
        h = self.heads
        q = split_heads(self.q_proj(x), h)                 # (B, H, N, hd), unscaled, bias included
        bias = None
        if pos_bias is not None:
            bias = pos_bias[None]
            if self.gated:  # gate per layer, head and query (MM/models/backbones/beats/backbone.py:829-835)
                B, H, N, _ = q.shape
                a, b = torch.sigmoid(self.grep_linear(q).view(B, H, N, 2, 4).sum(-1)).chunk(2, dim=-1)
                bias = (a * (b * self.grep_a - 1.0) + 2.0) * bias
            bias = bias.to(q.dtype)
        y = attend(q, split_heads(self.k_proj(x), h), split_heads(self.v_proj(x), h), mask=bias,
                   dropout=self.dropout if self.training else 0.0)
        return self.out_proj(merge_heads(y))


class BeatsLayer(nn.Module):
    """Post-LN with deep-norm residual gain: x = LN(alpha x + attn(x)); x = LN(alpha x + FFN(x))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = BeatsAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim)
        self.alpha = (2 * cfg.depth) ** 0.25 if cfg.deep_norm else 1.0
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pos_bias):
        x = self.self_attn_layer_norm(self.alpha * x + self.drop(self.self_attn(x, pos_bias)))
        h = F.gelu(self.fc1(x).float()).to(x.dtype)        # GELU in fp32 (MM/models/backbones/beats/modules.py:93-94)
        return self.final_layer_norm(self.alpha * x + self.drop(self.fc2(self.drop(h))))


class BeatsEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.pos_conv = PosConv(cfg.dim, cfg.pos_conv, cfg.pos_conv_groups)
        self.layer_norm = nn.LayerNorm(cfg.dim)
        self.layers = nn.ModuleList(BeatsLayer(cfg) for _ in range(cfg.depth))
        self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.heads) if cfg.num_buckets else None
        self.cfg = cfg

    def position_bias(self, n, device):
        """T5 bidirectional buckets of (key - query) -> (H, N, N), computed once for all layers."""
        rel = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]
        half = self.cfg.num_buckets // 2
        bucket = (rel > 0).long() * half
        rel = rel.abs()
        exact = half // 2
        large = exact + (torch.log(rel.float().clamp_min(1) / exact) / math.log(self.cfg.max_distance / exact)
                         * (half - exact)).long()                       # cast truncates toward zero
        bucket = bucket + torch.where(rel < exact, rel, large.clamp_max(half - 1))
        return self.relative_attention_bias(bucket).permute(2, 0, 1)

    def forward(self, x):
        x = self.layer_norm(x + self.pos_conv(x))
        bias = self.position_bias(x.shape[1], x.device) if self.relative_attention_bias is not None else None
        for layer in self.layers:
            x = layer(x, bias)
        return x


class AudioEncoder(nn.Module):
    """BEATs: fbank (B, frames, mel) -> Conv2d 16x16 patches (time-major tokens) -> LayerNorm ->
    projection -> conv position embedding + LayerNorm -> post-LN layers -> (B, N, dim); no final norm.
    Parameter names follow the official checkpoint (MM/models/backbones/beats/BEATs.py:86-101) except the weight-normed
    position conv (`encoder.pos_conv.0.weight_g` there, `encoder.pos_conv.weight_g` here; load_beats maps it)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.patch_dim, kernel_size=cfg.patch, stride=cfg.patch, bias=False)
        self.layer_norm = nn.LayerNorm(cfg.patch_dim)
        self.post_extract_proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.encoder = BeatsEncoder(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, fbank):
        x = self.patch_embedding(fbank[:, None])                # (B, E, T', F')
        x = self.layer_norm(x.flatten(2).transpose(1, 2))       # (B, T'F', E), token = t * F' + f
        return self.encoder(self.drop(self.post_extract_proj(x)))


# ------------------------------------------------------------------------------------------------
# the stage-2 model (MM/models/internvideo2_stage2_visual.py:40-44; MM/models/internvideo2_stage2_audiovisual.py:47-75)

class Stage2Model(nn.Module):
    """Vision encoder + BERT (+ frozen BEATs) with the projection heads of stage 2. Top-level names
    follow the official checkpoints (vision_encoder, text_encoder, audio_encoder, vision_proj, ...).
    With audio, every vision token is projected to av_dim + LayerNorm before it enters cross-attention,
    and the fusion layers read av_dim-wide memories (MM/models/internvideo2_stage2_audiovisual.py:47, 811-816)."""

    def __init__(self, vcfg: VisionConfig, tcfg: TextConfig, acfg: AudioConfig = None, contrastive_dim=None, av_dim=768,
                 temp=0.07):
        super().__init__()
        contrastive_dim = contrastive_dim or (768 if acfg else 512)  # 1B: MM/scripts/pretraining/stage2/1B/config.py:78
        self.contrastive_dim, self.av_dim = contrastive_dim, av_dim
        self.vision_encoder = InternVideo2(vcfg)
        self.text_encoder = TextEncoder(replace(tcfg, cross_width=av_dim if acfg else vcfg.dim))
        self.vision_proj = nn.Linear(vcfg.pool_dim, contrastive_dim)
        self.text_proj = nn.Linear(tcfg.dim, contrastive_dim)
        self.itm_head = nn.Linear(tcfg.dim, 2)
        self.temp = nn.Parameter(torch.tensor(temp))  # clamp per step: MM/models/internvideo2_stage2_visual.py:292-294
        self.has_audio = acfg is not None
        if acfg:
            self.audio_encoder = AudioEncoder(acfg)
            self.audio_proj = nn.Linear(acfg.dim, contrastive_dim)
            self.av_concat_vision_proj = nn.Sequential(nn.Linear(vcfg.dim, av_dim), nn.LayerNorm(av_dim))
            self.av_concat_audio_proj = nn.Sequential(nn.Linear(acfg.dim, av_dim), nn.LayerNorm(av_dim))
            self.av_fusion = nn.Linear(2 * contrastive_dim, contrastive_dim)
            self.avtm_head = nn.Linear(tcfg.dim, 2)
        for name, m in self.named_children():               # fresh heads: trunc-normal 0.02, bias 0
            if name.endswith(("_proj", "_head", "av_fusion")):
                for lin in [m] if isinstance(m, nn.Linear) else [x for x in m.modules() if isinstance(x, nn.Linear)]:
                    nn.init.trunc_normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)

    def no_weight_decay(self):
        return {"temp"} | {f"vision_encoder.{n}" for n in self.vision_encoder.no_weight_decay()}

    def encode_video(self, video, visible=None):
        """-> memory tokens for cross-attention (B, Nv, D or av_dim), raw projected embedding (B, E)."""
        x, _ = self.vision_encoder.forward_features(video, visible)
        emb = self.vision_proj(self.vision_encoder.clip_projector(x))
        memory = self.av_concat_vision_proj(x) if self.has_audio else x
        return memory, emb

    def encode_audio(self, fbank):
        """-> memory tokens (B, Na, av_dim), raw projected embedding (B, E) of the mean token (taken
        before the concat projection, MM/models/internvideo2_stage2_audiovisual.py:727-729)."""
        a = self.audio_encoder(fbank)
        return self.av_concat_audio_proj(a), self.audio_proj(a.mean(1))

    def encode_text(self, ids, pad_mask):
        """-> text-layer states (B, L, H), raw projected [CLS] embedding (B, E)."""
        h = self.text_encoder.forward_text(ids, pad_mask)
        return h, self.text_proj(h[:, 0])

    def fuse_av(self, a_emb, v_emb):
        return self.av_fusion(torch.cat([a_emb, v_emb], dim=-1))

    def match_logits(self, text_states, pad_mask, memory, head="itm"):
        """Fusion layers over (text, memory) pairs -> the matching head's 2 logits on [CLS]."""
        h = self.text_encoder.forward_fusion(text_states, pad_mask, memory)
        return (self.itm_head if head == "itm" else self.avtm_head)(h[:, 0])

    def model_config(self):
        """What from_config rebuilds this model from, as a stage-2 checkpoint records it."""
        return {"vision": asdict(self.vision_encoder.cfg), "text": asdict(self.text_encoder.cfg),
                "audio": asdict(self.audio_encoder.cfg) if self.has_audio else None,
                "contrastive_dim": self.contrastive_dim, "av_dim": self.av_dim}

    @staticmethod
    def from_config(mc):
        """Rebuild from a stage-2 checkpoint's model_config (vision, text, audio dicts and the widths)."""
        return Stage2Model(VisionConfig.from_saved(mc["vision"]), TextConfig(**mc["text"]),
                           AudioConfig(**mc["audio"]) if mc.get("audio") else None, mc["contrastive_dim"], mc["av_dim"])


# ------------------------------------------------------------------------------------------------
# stage 3: the Q-Former bridge (VideoChat2: VC2/models/blip2/blip2.py:53-69)

@dataclass
class QFormerConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_query: int = 32            # learned queries ...
    extra_query: int = 64          # ... + extra queries = 96 visual tokens for the LLM
    cross_every: int = 2           # cross-attention to the video in layers 0, 2, 4, ...
    vision_width: int = 1408       # width of the video tokens
    vocab_size: int = 30522        # BERT vocabulary (instruction text, captioning)
    max_len: int = 512
    dropout: float = 0.1           # hidden and attention dropout
    drop_path: float = 0.2
    eps: float = 1e-12
    init_std: float = 0.02         # as TextConfig.init_std


QFORMER_PRESETS = {
    "toy": QFormerConfig(dim=96, depth=4, heads=4, mlp_dim=384, num_query=8, extra_query=8, vision_width=96,
                         vocab_size=0, max_len=64, dropout=0.0, drop_path=0.0, init_std=0.06),
    "base": QFormerConfig(),
}


class QFormerLayer(nn.Module):
    """BLIP-2 layer over [queries; text]: joint self-attention (who sees whom is the mask's business),
    cross-attention to the video for the queries only (every cross_every-th layer), and separate
    feed-forward networks for queries and text. Post-LN, as BERT."""

    def __init__(self, cfg: QFormerConfig, cross, drop_path=0.0):
        super().__init__()
        H = cfg.dim
        self.attn, self.attn_norm = BertAttention(H, cfg.heads, dropout=cfg.dropout), nn.LayerNorm(H, eps=cfg.eps)
        if cross:
            self.cross = BertAttention(H, cfg.heads, kv_dim=cfg.vision_width, dropout=cfg.dropout)
            self.cross_norm = nn.LayerNorm(H, eps=cfg.eps)
        self.fc1, self.fc2, self.ffn_norm = nn.Linear(H, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, H), \
            nn.LayerNorm(H, eps=cfg.eps)
        self.fc1_q, self.fc2_q, self.ffn_norm_q = nn.Linear(H, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, H), \
            nn.LayerNorm(H, eps=cfg.eps)
        self.drop, self.drop_path = nn.Dropout(cfg.dropout), DropPath(drop_path)

    def forward(self, x, n_query, mask, video):       # x: (B, Q + L, H); video: (B, N, vision_width)
        x = self.attn_norm(x + self.drop_path(self.drop(self.attn(x, mask=mask))))
        q, t = x[:, :n_query], x[:, n_query:]
        if n_query:
            if hasattr(self, "cross"):
                q = self.cross_norm(q + self.drop_path(self.drop(self.cross(q, video))))
            q = self.ffn_norm_q(q + self.drop_path(self.drop(self.fc2_q(F.gelu(self.fc1_q(q))))))
        if t.shape[1]:
            t = self.ffn_norm(t + self.drop_path(self.drop(self.fc2(F.gelu(self.fc1(t))))))
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    """Learned queries that read the video through cross-attention and talk to text through shared
    self-attention (VC2/models/videochat_mistra/videochat2_it_mistral.py:198-216). Modes (the attention mask decides):
      query    queries only -> the visual tokens for the LLM, or the contrastive embedding
      text     text only -> its [CLS] for the contrastive loss
      joint    queries and text see each other (matching; instruction-conditioned queries)
      caption  queries see queries, text sees the queries and earlier text (captioning loss)"""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("QFormerConfig.vocab_size must be set (from the BERT vocabulary)")
        self.cfg, H = cfg, cfg.dim
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query, H))
        self.extra_query_tokens = nn.Parameter(torch.zeros(1, cfg.extra_query, H))
        self.word_emb, self.pos_emb = nn.Embedding(cfg.vocab_size, H), nn.Embedding(cfg.max_len, H)
        self.emb_norm, self.drop = nn.LayerNorm(H, eps=cfg.eps), nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(QFormerLayer(cfg, i % cfg.cross_every == 0,
                                                 cfg.drop_path * i / max(cfg.depth - 1, 1)) for i in range(cfg.depth))
        self.lm_dense, self.lm_norm = nn.Linear(H, H), nn.LayerNorm(H, eps=cfg.eps)
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=cfg.init_std)
        nn.init.normal_(self.extra_query_tokens, std=cfg.init_std)

    def forward(self, video=None, ids=None, pad_mask=None, mode="query"):
        """video: (B, N, vision_width); ids, pad_mask: (B, L). -> (query states (B, Q, H), text states (B, L, H))."""
        parts, Q = [], 0
        if mode != "text":
            B = video.shape[0]
            parts.append(torch.cat([self.query_tokens, self.extra_query_tokens], 1).expand(B, -1, -1))
            Q = parts[0].shape[1]
        L = 0 if ids is None or mode == "query" else ids.shape[1]
        if L:
            parts.append(self.word_emb(ids) + self.pos_emb(torch.arange(L, device=ids.device))[None])
        x = self.drop(self.emb_norm(torch.cat(parts, 1)))
        B, dev = x.shape[0], x.device
        keys = torch.ones(B, Q + L, dtype=torch.bool, device=dev)          # which positions are real
        if L:
            keys[:, Q:] = pad_mask.bool()
        mask = keys[:, None, None, :].expand(B, 1, Q + L, Q + L).clone()
        if mode == "caption":                                              # queries never see the text,
            mask[:, :, :Q, Q:] = False                                     # text sees earlier text only
            mask[:, :, Q:, Q:] &= torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        for layer in self.layers:
            x = layer(x, Q, mask, video)
        return x[:, :Q], x[:, Q:]

    def lm_logits(self, h):
        return F.linear(self.lm_norm(F.gelu(self.lm_dense(h))), self.word_emb.weight, self.lm_bias)


# ------------------------------------------------------------------------------------------------
# stage 3: the LLM (LLaMA / Mistral), with a KV cache and LoRA

@dataclass
class LLMConfig:
    vocab_size: int = 32000
    dim: int = 4096
    depth: int = 32
    heads: int = 32
    kv_heads: int = 8              # grouped-query attention
    mlp_dim: int = 14336           # SwiGLU width
    rope_theta: float = 1e6        # Mistral-7B-Instruct-v0.2
    eps: float = 1e-5


LLM_PRESETS = {
    "toy": LLMConfig(vocab_size=0, dim=128, depth=4, heads=4, kv_heads=2, mlp_dim=384, rope_theta=10000.0),
    "mistral-7b": LLMConfig(),
}


def rope_tables(positions, head_dim, theta):
    """cos, sin of shape (B, 1, L, head_dim) for integer positions (B, L) (the rotate-half layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    ang = positions[..., None].float() * inv                          # (B, L, hd/2)
    ang = torch.cat([ang, ang], dim=-1)[:, None]                       # (B, 1, L, hd)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i + hd/2}) pair by its position's angle: a rotation, so norms are kept
    and q.k depends on the positions only through their difference."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class LLMAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        hd = cfg.dim // cfg.heads
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        """x: (B, L, dim); cache: None or a (k, v) pair of (B, Hkv, T, hd) from earlier steps.
        Returns the output and the new (k, v) including this step."""
        q = apply_rope(split_heads(self.q_proj(x), self.heads), cos, sin)
        k = apply_rope(split_heads(self.k_proj(x), self.kv_heads), cos, sin)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        return self.o_proj(merge_heads(attend(q, k, v, mask=mask))), (k, v)


class LLMBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps), RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = LLMAttention(cfg)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + h
        m, y = self.mlp, self.post_attention_layernorm(x)
        return x + m.down_proj(F.silu(m.gate_proj(y)) * m.up_proj(y)), cache      # SwiGLU


class LLM(nn.Module):
    """LLaMA/Mistral decoder: RMSNorm, rotary positions, SwiGLU, grouped-query attention, untied
    lm_head. Keys are Hugging Face's without the `model.` prefix (llm_key_map adds it)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("LLMConfig.vocab_size must be set (from the LLM tokenizer)")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LLMBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, embeds, pad_mask=None, cache=None, positions=None):
        """embeds: (B, L, dim) input embeddings (text tokens and spliced visual tokens alike);
        pad_mask: (B, T) 1 for real tokens over the cache and this step (left padding allowed);
        cache: per-layer (k, v) list from earlier steps. Returns (logits (B, L, vocab), new cache)."""
        B, L, _ = embeds.shape
        past = 0 if cache is None else cache[0][0].shape[2]
        if pad_mask is None:
            pad_mask = torch.ones(B, past + L, dtype=torch.long, device=embeds.device)
        if positions is None:                                  # count real tokens: left padding is fine
            positions = (pad_mask.long().cumsum(1) - 1).clamp_min(0)[:, past:]
        cos, sin = rope_tables(positions, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta)
        causal = torch.ones(L, past + L, dtype=torch.bool, device=embeds.device).tril(past)
        mask = causal[None, None] & pad_mask.bool()[:, None, None, :]               # (B, 1, L, T)
        x, new_cache = embeds, []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.lm_head(self.norm(x)), new_cache


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """(B, V) logits -> (B,) ids: greedy at temperature 0, else temperature and nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p                   # keep the smallest set reaching top_p
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def generate(llm, embeds, pad_mask, max_new_tokens, eos_id, temperature=0.0, top_p=1.0, generator=None):
    """Decode with the KV cache: one forward over the (left-padded) prompt embeddings (B, L, dim),
    then one token at a time. Returns (B, n) ids; rows that finished are filled with eos_id."""
    logits, cache = llm(embeds, pad_mask)
    out, done = [], torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_p, generator).masked_fill(done, eos_id)
        out.append(nxt)
        done |= nxt == eos_id
        if done.all():
            break
        pad_mask = torch.cat([pad_mask, torch.ones_like(pad_mask[:, :1])], dim=1)
        logits, cache = llm(llm.embed_tokens(nxt[:, None]), pad_mask, cache)
    return torch.stack(out, dim=1)


class LoRALinear(nn.Module):
    """W x + (alpha / r) B A dropout(x), with A ~ Kaiming-uniform and B = 0 so training starts at W;
    `merge` folds B A into W for inference (equal outputs, tested)."""

    def __init__(self, base: nn.Linear, r=16, alpha=32, dropout=0.1):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.drop = nn.Dropout(dropout)
        base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scale

    @torch.no_grad()
    def merged(self):
        w = self.base.weight + self.scale * (self.lora_B.weight @ self.lora_A.weight).to(self.base.weight.dtype)
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.base.bias is not None:
            lin.bias.copy_(self.base.bias)
        return lin


# every projection of every block and the output head (VC2/models/videochat_mistra/videochat2_it_mistral.py:143-150)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def add_lora(llm, r=16, alpha=32, dropout=0.1, targets=LORA_TARGETS):
    """Freeze the LLM and wrap every target Linear in LoRA (r, alpha, dropout:
    VC2/scripts/videochat_mistral/config_7b_stage3.py:79-82)."""
    llm.requires_grad_(False)
    for parent in list(llm.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, r, alpha, dropout))
    return llm


def lora_config(llm):
    """The {r, alpha, dropout, targets} of the LLM's adapters (None without LoRA), for a checkpoint's model_config."""
    names = [(n.split(".")[-1], m) for n, m in llm.named_modules() if isinstance(m, LoRALinear)]
    if not names:
        return None
    m = names[0][1]
    return {"r": m.lora_A.out_features, "alpha": m.scale * m.lora_A.out_features, "dropout": m.drop.p,
            "targets": [t for t in LORA_TARGETS if t in {n for n, _ in names}]}


def restore_lora(llm, saved):
    """add_lora with a checkpoint's recorded settings (model_config["lora"]); checkpoints written before lm_head
    joined the targets did not record them, and had the other seven."""
    return add_lora(llm, **{"targets": LORA_TARGETS[:-1], **saved})


def merge_lora(llm):
    """Replace every LoRALinear by its merged Linear (in place)."""
    for parent in list(llm.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return llm


class Stage3Model(nn.Module):
    """Video encoder (penultimate-block tokens + an extra LayerNorm) -> Q-Former (queries, optionally conditioned on
    the instruction) -> Linear to the LLM width -> LLM (VC2/models/videochat_mistra/videochat2_it_mistral.py:175-256).
    The contrastive/matching heads serve the Q-Former alignment sub-stage."""

    def __init__(self, vcfg: VisionConfig, qcfg: QFormerConfig, lcfg: LLMConfig, contrastive_dim=256, temp=0.07):
        super().__init__()
        self.vision_encoder = InternVideo2(vcfg)
        self.vision_layernorm = nn.LayerNorm(vcfg.dim, eps=1e-12)        # vit_add_ln
        self.qformer = QFormer(replace(qcfg, vision_width=vcfg.dim))
        self.llm_proj = nn.Linear(qcfg.dim, lcfg.dim)                        # VideoChat2's mistral_proj
        self.llm = LLM(lcfg)
        self.vision_proj = nn.Linear(qcfg.dim, contrastive_dim)
        self.text_proj = nn.Linear(qcfg.dim, contrastive_dim)
        self.itm_head = nn.Linear(qcfg.dim, 2)
        self.temp = nn.Parameter(torch.tensor(temp))

    def set_trainable(self, substage):
        """Sub-stage 1: the Q-Former and its heads. 2: + video encoder and projection, LLM frozen.
        3: + LoRA adapters on the frozen LLM (VC2/README.md:78-80)."""
        self.requires_grad_(False)
        for m in (self.qformer, self.vision_proj, self.text_proj, self.itm_head):
            m.requires_grad_(True)
        self.temp.requires_grad_(True)
        if substage >= 2:
            for m in (self.vision_encoder, self.vision_layernorm, self.llm_proj):
                m.requires_grad_(True)
        if substage == 3:
            for name, p in self.llm.named_parameters():
                p.requires_grad_("lora_" in name)

    def video_tokens(self, video):
        """(B, 3, T, H, W) -> (B, 1 + N, D): the penultimate block's tokens (x_vis_return_idx = -2)."""
        depth = len(self.vision_encoder.blocks)
        x, _ = self.vision_encoder.forward_features(video, stop_after=depth - 2)
        return self.vision_layernorm(x)

    def visual_embeds(self, video_tokens, instr_ids=None, instr_mask=None):
        """-> (B, Q, llm dim): query outputs, conditioned on the instruction when given."""
        mode = "query" if instr_ids is None else "joint"
        q, _ = self.qformer(video_tokens, instr_ids, instr_mask, mode)
        return self.llm_proj(q)

    def chat_embeds(self, ids, visual, at):
        """LLM input embeddings of token ids (B, L) with the visual embeddings (B, Q, dim) spliced in at
        index `at` (after <Video>), replacing the placeholder slots; BOS keeps its real embedding."""
        emb = self.llm.embed_tokens(ids)
        return torch.cat([emb[:, :at], visual.to(emb.dtype), emb[:, at + visual.shape[1]:]], dim=1)

    def no_weight_decay(self, substage):
        """Parameters kept out of weight decay by name, besides the 1-D ones and biases (common.build_optimizer, as
        VC2/utils/optimizer.py:17-28 called from VC2/tasks/shared_utils.py:56). Sub-stage 1 is VideoChat2's Q-Former
        alignment model, which names {query_tokens, temp, vision_temp_embed, vision_encoder.class_embedding,
        vision_encoder.positional_embedding} (VC2/models/videochat2_qformer.py:376-384): here the queries, both tables
        (the official stage 1 has one, of 32; ours carries the 64 extra from the start), and temp; the video encoder is
        frozen in our sub-stage 1 and its UMT encoder's temporal table does not exist here. Sub-stages 2-3 are
        VideoChat2's instruction model, which names nothing (VC2/models/videochat_mistra/videochat2_it_mistral.py has no
        no_weight_decay): the queries, pos_embed and cls_token are decayed; temp, 0-d, is exempt by the 1-D rule."""
        return {"temp", "qformer.query_tokens", "qformer.extra_query_tokens"} if substage == 1 else set()

    def model_config(self):
        """What from_config rebuilds this model from, as a stage-3 checkpoint records it (the LoRA settings: None
        before sub-stage 3)."""
        return {"vision": asdict(self.vision_encoder.cfg), "qformer": asdict(self.qformer.cfg),
                "llm": asdict(self.llm.cfg), "lora": lora_config(self.llm)}

    @staticmethod
    def from_config(mc):
        """Rebuild from a checkpoint's model_config (vision, qformer, llm dicts and the LoRA settings)."""
        model = Stage3Model(VisionConfig.from_saved(mc["vision"]), QFormerConfig(**mc["qformer"]),
                            LLMConfig(**mc["llm"]), mc.get("contrastive_dim", 256))
        if mc.get("lora"):
            restore_lora(model.llm, mc["lora"])
        return model


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
