"""teachers.py: the two frozen stage-1 teachers and their checkpoint loading.

  InternViTTeacher   image teacher (InternViT-6B of InternVL-C, SM/models/internvl_clip_vision.py:336-465): runs
                     frame by frame; returns the last K blocks' tokens with the frame-averaged CLS,
                     the frame-averaged pooled vector, and its pooling query's attention per frame
  VideoMAETeacher    video teacher (VideoMAEv2-g; SM/models/videomae.py:329-338): tubelet 2 over twice the student's
                     frames; returns the last K blocks' tokens, the final LayerNorm on the last only;
                     mae_teacher_attention="official" runs its attention as the released stage-1 code does
                     (OfficialVideoMAEAttention)
  Teachers           both, frozen and kept OUTSIDE the student: not its submodules, so never in its
                     optimizer, its DDP wrapper or its checkpoint, and never back in training mode
  load_teacher, build_teachers   a teacher from its official checkpoint layout; the frozen pair

Both reuse model.py's blocks; their parameter names are the official checkpoint keys. On ToyWorld they are small
networks trained there, shipped in toys/ in the official checkpoint layouts, so loading them runs the same code as
loading InternVL-C or VideoMAEv2-g (pretrain_toys.py trains them). FP8 teachers (--teacher_dtype=float8) are fp8.py.

    python -m pytest -q tests/test_teachers.py     # what they promise: frozen, official layouts, official outputs
"""
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from checkpoints import check_fits, key_names, released_state
from common import CheckpointError
from model import Attention, AttentionPool, Block, PatchEmbed, VisionConfig, attend, preset, sincos_2d, sinusoid_table

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


class OfficialVideoMAEAttention(Attention):
    """The video teacher's attention as InternVideo2's stage-1 code runs it (SM/models/videomae.py:93-96): q, k, v are
    permuted to (B, heads, N, hd) and handed to flash_attn_func, which reads (B, seqlen, heads, hd). So each token
    attends over its own heads (seqlen = heads) instead of over the tokens, and the (B, heads, N, hd) result is
    reshaped to (B, N, dim) without a transpose back. The released checkpoint was trained with real attention over the
    tokens (model.Attention, mae_teacher_attention="standard", the default); this reproduces the targets the released
    stage-1 code computes from it (README, differences). Same parameters as model.Attention."""

    def forward(self, x):                                # x: (B, N, D)
        q, k, v = (t.transpose(1, 2) for t in self.heads_qkv(x))   # flash's view of (B, H, N, hd): seqlen H, N "heads"
        y = attend(q, k, v)                                          # (B, N, H, hd): the softmax runs over the H heads
        return self.proj(y.transpose(1, 2).reshape(x.shape))         # (B, H, N, hd) memory read as (B, N, D)


MAE_TEACHER_ATTENTION = {"standard": Attention, "official": OfficialVideoMAEAttention}


class VideoMAETeacher(nn.Module):
    """VideoMAEv2-style video teacher: no CLS, fixed 1-D sinusoid positions, LayerNorm blocks with
    q/v biases and exact GELU, a final `norm`. mae_teacher_attention: "standard" (real attention) | "official"
    (OfficialVideoMAEAttention: as the released stage-1 code runs it)."""

    def __init__(self, cfg: VisionConfig, mae_teacher_attention="standard"):
        super().__init__()
        if mae_teacher_attention not in MAE_TEACHER_ATTENTION:
            raise ValueError(f"mae_teacher_attention must be 'standard' or 'official', got {mae_teacher_attention!r}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_patches, cfg.dim), persistent=False)
        attention = MAE_TEACHER_ATTENTION[mae_teacher_attention]
        self.blocks = nn.ModuleList(Block(cfg, attention=attention) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        _init_linear(self)

    def forward_features(self, video):
        """(B, 3, 2T, H, W) -> every token after the final norm (B, N, D)."""
        x = self.patch_embed(video).flatten(1, 2) + self.pos_embed
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


def load_teacher(kind, preset, path, **options):
    """Build a teacher and load its checkpoint in the official layout:
    image teacher: {'module': state} (DeepSpeed), 2-D patch kernel inflated to Conv3d, pos_embed
    resized bicubically if the grid differs; video teacher: {'model': {'encoder.' + key: ...}}.
    options: the network's own (VideoMAETeacher: mae_teacher_attention).
    Missing or mis-shaped keys raise KeyError naming them; unexpected keys are listed and ignored."""
    table, Net = (CLIP_TEACHER_PRESETS, InternViTTeacher) if kind == "clip" else (MAE_TEACHER_PRESETS, VideoMAETeacher)
    net = Net(teacher_preset(table, preset), **options)
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
    unexpected = check_fits(own, state, path, f"the {preset} {kind} teacher")
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


def build_teachers(clip_preset, mae_preset, clip_ckpt=None, mae_ckpt=None, mae_teacher_attention="standard"):
    """The frozen pair; a None checkpoint leaves that teacher randomly initialised (benchmarks, tests).
    mae_teacher_attention: the video teacher's ("official": as the released stage-1 code runs it)."""
    clip = (load_teacher("clip", clip_preset, clip_ckpt) if clip_ckpt
            else InternViTTeacher(teacher_preset(CLIP_TEACHER_PRESETS, clip_preset)))
    mae = (load_teacher("mae", mae_preset, mae_ckpt, mae_teacher_attention=mae_teacher_attention) if mae_ckpt
           else VideoMAETeacher(teacher_preset(MAE_TEACHER_PRESETS, mae_preset), mae_teacher_attention))
    return Teachers(clip, mae)
