"""model.py: the attention primitive, the video encoder's masked forward, position tables, the
masking generators, and the official shapes and parameter counts (meta device)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import (InternVideo2, attend, attention_mask, count_params, interpolate_pos_embed_time, random_mask,
                   sincos_1d, sincos_3d, sinusoid_table, tube_mask, vision_preset)


def reference_attention(q, k, v, mask=None, causal=False):
    """softmax(q k^T / sqrt(d)) v written out, with k/v heads repeated for grouped-query attention."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attend_equals_reference(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    k, v = torch.randn(2, kv_heads, 7, 8, dtype=torch.float64), torch.randn(2, kv_heads, 7, 8, dtype=torch.float64)
    mask = torch.rand(2, 1, 1, 7) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attend(q, k, v), reference_attention(q, k, v))
    torch.testing.assert_close(attend(q, k, v, causal=True), reference_attention(q, k, v, causal=True))
    torch.testing.assert_close(attend(q, k, v, mask=mask), reference_attention(q, k, v, mask=mask))
    y, w = attend(q, k, v, mask=mask, need_weights=True)        # explicit path used by the pooling query
    torch.testing.assert_close(y, reference_attention(q, k, v, mask=mask))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7, dtype=torch.float64))


def _toy(**kw):
    torch.manual_seed(0)
    return InternVideo2(vision_preset("toy", **kw), with_heads=True).double().eval()


def _visible(B, T, Np, n_vis, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.randperm(T * Np, generator=g)[:n_vis].sort().values for _ in range(B)])
    return torch.cat([torch.zeros(B, 1, dtype=torch.long), keep + 1], 1)


def test_masked_forward_equals_forward_over_visible_tokens_alone():
    """Reference: embed each visible patch by itself (unfold + the Conv3d weight as a matrix), add its
    position, prepend CLS, and run the blocks on those tokens only."""
    m = _toy()
    cfg, B = m.cfg, 2
    video = torch.randn(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size, dtype=torch.float64)
    T, H = cfg.grid[0], cfg.grid[1]
    visible = _visible(B, T, H * H, 20)
    x, _ = m.forward_features(video, visible)
    p = cfg.patch_size                                       # (B, 3, T, H, W) -> (B, T*H*W, 3*p*p) tokens
    patches = video.unfold(3, p, p).unfold(4, p, p)          # (B, 3, T, h, w, p, p)
    patches = patches.permute(0, 2, 3, 4, 1, 5, 6).reshape(B, -1, 3 * p * p)
    w = m.patch_embed.proj.weight.reshape(cfg.dim, -1)
    tokens = torch.cat([m.cls_token.expand(B, -1, -1), patches @ w.t() + m.patch_embed.proj.bias], 1)
    tokens = (tokens + m.pos_embed)[torch.arange(B)[:, None], visible]
    for blk in m.blocks:
        tokens = blk(tokens)
    torch.testing.assert_close(x, tokens)


def test_masked_forward_ignores_pixels_of_masked_patches():
    m = _toy()
    cfg, B = m.cfg, 2
    video = torch.randn(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size, dtype=torch.float64)
    visible = _visible(B, cfg.grid[0], cfg.grid[1] ** 2, 25)
    out = m.forward_distill(video, visible)
    hidden = torch.ones(B, cfg.num_patches, dtype=torch.bool).scatter(1, visible[:, 1:] - 1, False)
    noise = torch.randn_like(video) * 10
    p, g = cfg.patch_size, cfg.grid[1]                     # pixel mask of the hidden patches
    pix = hidden.view(B, 1, cfg.grid[0], g, 1, g, 1).expand(B, 3, cfg.grid[0], g, p, g, p)
    pix = pix.reshape(video.shape)
    out2 = m.forward_distill(torch.where(pix, video + noise, video), visible)
    for k in out:
        torch.testing.assert_close(out[k], out2[k])
    changed = m.forward_distill(torch.where(pix, video, video + noise), visible)   # visible pixels do matter
    assert not torch.allclose(changed["clip"], out["clip"])


def test_distill_outputs_shapes_and_unit_norm():
    m = _toy()
    cfg, B = m.cfg, 3
    video = torch.randn(B, 3, cfg.num_frames, cfg.img_size, cfg.img_size, dtype=torch.float64)
    visible = _visible(B, cfg.grid[0], cfg.grid[1] ** 2, 17)
    out = m.forward_distill(video, visible)
    assert out["clip"].shape == (cfg.clip_return_layers, B, 18, cfg.clip_teacher_dim)
    assert out["mae"].shape == (cfg.mae_return_layers, B, 17, cfg.mae_teacher_dim)
    assert out["clip_final"].shape == (B, cfg.clip_teacher_final_dim)
    for v in out.values():
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[:-1], dtype=v.dtype))


def test_sincos_3d_layout():
    """First D/4 channels encode time only, the next 3D/8 the column (w) only, the last 3D/8 the row
    (h) only; CLS row zeros (FACTS 1.2)."""
    D, S, T = 64, 4, 3
    table = sincos_3d(D, S, T)[0]
    assert torch.all(table[0] == 0)
    grid = table[1:].reshape(T, S, S, D)                      # (t, h, w, D)
    torch.testing.assert_close(grid[:, 1, 2, :D // 4], sincos_1d(D // 4, torch.arange(T)).float())
    torch.testing.assert_close(grid[1, 3, :, D // 4:D // 4 + 3 * D // 8], sincos_1d(3 * D // 8, torch.arange(S)).float())
    torch.testing.assert_close(grid[2, :, 1, D // 4 + 3 * D // 8:], sincos_1d(3 * D // 8, torch.arange(S)).float())


def test_interpolate_pos_embed_time_is_linear_in_time():
    """A table that is linear in t is reproduced exactly at the new frame positions (8 -> 4)."""
    hw, D = 4, 8
    t = torch.arange(8, dtype=torch.float32)
    grid = (t[:, None, None] * torch.ones(1, hw, D)).reshape(1, 8 * hw, D)
    pos = torch.cat([torch.full((1, 1, D), 7.0), grid], 1)
    new = interpolate_pos_embed_time(pos, 8, 4)
    assert new.shape == (1, 1 + 4 * hw, D) and torch.all(new[0, 0] == 7.0)
    centres = (torch.arange(4) + 0.5) * 2 - 0.5                # align_corners=False sample points
    torch.testing.assert_close(new[0, 1:].reshape(4, hw, D)[:, 0, 0], centres)


def test_official_key_shapes_1B():
    """A few keys of the official 1B stage-1 checkpoint (FACTS 4.1)."""
    with torch.device("meta"):
        sd = InternVideo2(vision_preset("1B"), with_heads=True).state_dict()
    expect = {"cls_token": (1, 1, 1408), "pos_embed": (1, 2049, 1408), "mae_pos_embed": (1, 2048, 1408),
              "patch_embed.proj.weight": (1408, 3, 1, 14, 14), "blocks.0.attn.qkv.weight": (4224, 1408),
              "blocks.0.attn.q_norm.weight": (1408,), "blocks.39.ls2.gamma": (1408,),
              "blocks.0.mlp.fc1.weight": (6144, 1408), "clip_projector.cross_attn.q_bias": (1408,),
              "clip_projector.cross_attn.proj.weight": (768, 1408), "clip_decoder.5.head.weight": (3200, 1408),
              "final_clip_decoder.head.weight": (768, 768), "mae_decoder.3.head.2.weight": (1408, 1408)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "blocks.0.attn.qkv.bias" not in sd and "blocks.0.norm1.bias" not in sd


@pytest.mark.parametrize("preset,encoder,full", [("1B", 1020.7, 1070.0), ("6B", 5941.7, 6075.9)])
def test_parameter_counts_match_official(preset, encoder, full):
    with torch.device("meta"):
        enc = InternVideo2(vision_preset(preset))
        whole = InternVideo2(vision_preset(preset), with_heads=True)
    assert round(count_params(enc) / 1e6, 1) == encoder
    assert round(count_params(whole) / 1e6, 1) == full


def test_bad_vision_config_is_named():
    with pytest.raises(ValueError, match="img_size must be a multiple of patch_size"):
        vision_preset("toy", img_size=30)
    with pytest.raises(ValueError, match="unknown vision preset"):
        vision_preset("huge")
    m = _toy()
    with pytest.raises(ValueError, match="model was built for"):
        m(torch.zeros(1, 3, 4, 32, 32, dtype=torch.float64))


def test_activation_checkpointing_gives_the_same_gradients():
    m = _toy()
    m.train()
    video = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    visible = _visible(2, 8, 16, 30)
    grads = []
    for n in (0, 3):
        m.grad_ckpt_blocks = n
        m.zero_grad()
        out = m.forward_distill(video, visible)
        (out["clip"].sum() + out["mae"].pow(2).sum() + out["clip_final"].sum()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_attention_mask_counts_and_cls():
    B, T, Np, ratio = 3, 4, 16, 0.8
    attn = torch.rand(B * T, Np)
    vis = attention_mask(attn, torch.rand(B, T, Np), ratio)
    n = Np - int(ratio * Np)
    assert vis.shape == (B, 1 + T * n) and torch.all(vis[:, 0] == 0)
    assert torch.all(vis[:, 1:].diff(dim=1) > 0)                        # sorted, no repeats
    frames = (vis[:, 1:] - 1) // Np
    for t in range(T):
        assert torch.all((frames == t).sum(1) == n)                      # exactly n per frame


def test_attention_mask_samples_without_replacement_in_proportion_to_attention():
    """The first pick of weighted sampling without replacement has P(i) = w_i / sum(w); with ratio
    such that one patch is kept, the kept patch is exactly that first pick."""
    torch.manual_seed(0)
    w = torch.tensor([8.0, 4.0, 2.0, 1.0, 1.0, 0.5, 0.25, 0.25])
    n = 40000
    vis = attention_mask(w.expand(n, 8), torch.rand(n, 1, 8), ratio=7 / 8)
    freq = torch.bincount(vis[:, 1] - 1, minlength=8).float() / n
    torch.testing.assert_close(freq, w / w.sum(), atol=0.01, rtol=0)
    vis = attention_mask(w.expand(n, 8), torch.rand(n, 1, 8), ratio=0.5)    # keep 4: top weights favoured
    kept = torch.bincount((vis[:, 1:] - 1).flatten(), minlength=8).float() / n
    assert kept[0] > 0.95 and torch.all(kept.diff() <= 0.02)


def test_tube_and_random_masks():
    noise = torch.rand(2, 4, 16)
    vis = tube_mask(noise, 0.75)
    spatial = ((vis[:, 1:] - 1) % 16).view(2, 4, 4)
    assert torch.all(spatial == spatial[:, :1])                         # the same patches in every frame
    vis = random_mask(noise, 0.8)
    assert vis.shape == (2, 1 + 64 - int(0.8 * 64)) and torch.all(vis[:, 0] == 0)
    assert torch.all(vis[:, 1:].diff(dim=1) > 0)


def test_sinusoid_table_is_the_official_float64_table():
    # SM/models/videomae.py:160-168 builds the table in numpy float64 and casts it once to float32
    n, d = 2048, 1408
    j = np.arange(d)
    angle = np.arange(n)[:, None] / np.power(10000, 2 * (j // 2) / d)[None]
    angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
    assert torch.equal(sinusoid_table(n, d), torch.tensor(angle, dtype=torch.float32)[None])
