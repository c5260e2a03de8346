"""teachers.py: frozen and outside the student, official checkpoint layouts, output conventions."""

import pytest
import torch
import torch.nn.functional as F

from model import InternVideo2, count_params, vision_preset
from pretrain_toys import pretrain_toy_teachers
from teachers import (CLIP_TEACHER_PRESETS, MAE_TEACHER_PRESETS, InternViTTeacher, OfficialVideoMAEAttention,
                      VideoMAETeacher, build_teachers, load_teacher)


def _video(B=2, T=16):
    torch.manual_seed(0)
    return torch.randn(B, 3, T, 32, 32)


def test_teachers_get_no_grads_and_stay_in_eval():
    teachers = build_teachers("toy", "toy")
    student = InternVideo2(vision_preset("toy"), with_heads=True)
    student.train()
    teachers.clip.train()
    teachers.mae.train(True)
    for net in (teachers.clip, teachers.mae):
        assert all(not m.training for m in net.modules())
        assert all(not p.requires_grad for p in net.parameters())
    video = _video()
    tgt = teachers(video)
    assert all(not t.requires_grad for t in (tgt["clip"], tgt["mae"]))
    visible = torch.arange(0, 129, 4)[None].expand(2, -1)
    out = student.forward_distill(video[:, :, ::2], visible)
    (out["clip"].sum() + out["mae"].sum() + (out["clip_final"] * tgt["clip_final"]).sum()).backward()
    assert all(p.grad is None for net in (teachers.clip, teachers.mae) for p in net.parameters())
    assert not any(k.startswith(("clip.", "mae.", "teacher")) for k in student.state_dict())


def test_teacher_outputs_follow_the_official_conventions():
    teachers = build_teachers("toy", "toy")
    video = _video()
    out = teachers(video)
    K, D, B = CLIP_TEACHER_PRESETS["toy"].clip_return_layers, 96, 2
    assert out["clip"].shape == (K, B, 1 + 8 * 16, D) and out["attn"].shape == (B, 8, 16)
    assert out["mae"].shape == (MAE_TEACHER_PRESETS["toy"].mae_return_layers, B, 8 * 16, D)
    for v in (out["clip"], out["clip_final"], out["mae"]):
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[:-1]))
    # the CLS target is the frame-average of the per-frame CLS tokens (then L2)
    frames = video[:, :, ::2].transpose(1, 2).reshape(B * 8, 3, 1, 32, 32)
    _, hidden = teachers.clip.tokens(frames, layers={3})
    cls = hidden[3][:, 0].reshape(B, 8, D).mean(1)
    torch.testing.assert_close(out["clip"][-1, :, 0], F.normalize(cls, dim=-1))
    # only the MAE teacher's last layer passes through its final LayerNorm
    x = teachers.mae.patch_embed(video).flatten(1, 2) + teachers.mae.pos_embed
    for blk in teachers.mae.blocks:
        x = blk(x)
    torch.testing.assert_close(out["mae"][-1], F.normalize(teachers.mae.norm(x), dim=-1))
    assert out["attn"].min() >= 0 and torch.all(out["attn"].sum(-1) <= 1 + 1e-5)


def test_checkpoints_load_from_the_official_layouts(tmp_path):
    torch.manual_seed(1)
    clip, mae = InternViTTeacher(CLIP_TEACHER_PRESETS["toy"]), VideoMAETeacher(MAE_TEACHER_PRESETS["toy"])
    sd = clip.state_dict()
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"][:, :, 0]        # InternVL's 2-D kernel
    sd["text_projection"] = torch.zeros(3)                                        # unused extra key
    torch.save({"module": sd}, tmp_path / "clip.pth")
    torch.save({"model": {"encoder." + k: v for k, v in mae.state_dict().items()}
                | {"decoder.head.weight": torch.zeros(2)}}, tmp_path / "mae.pth")
    loaded = build_teachers("toy", "toy", tmp_path / "clip.pth", tmp_path / "mae.pth")
    video = _video()
    torch.testing.assert_close(loaded.clip(video[:, :, ::2])["clip"], clip.eval()(video[:, :, ::2])["clip"])
    torch.testing.assert_close(loaded.mae(video), mae.eval()(video))
    del sd["blocks.2.attn.qkv.weight"]
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    torch.save({"module": sd}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"missing \['blocks\.2\.attn\.qkv\.weight'\].*blocks\.0\.mlp\.fc1\.weight"):
        load_teacher("clip", "toy", tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_teacher("mae", "toy", tmp_path / "nowhere.pth")


def test_full_teacher_shapes_on_meta():
    with torch.device("meta"):
        vit, mae = InternViTTeacher(CLIP_TEACHER_PRESETS["internvit-6b"]), VideoMAETeacher(MAE_TEACHER_PRESETS["videomae-g"])
    sd = vit.state_dict()
    assert len(vit.blocks) == 48 and tuple(sd["blocks.0.attn.qkv.weight"].shape) == (9600, 3200)
    assert tuple(sd["blocks.0.attn.q_norm.weight"].shape) == (3200,) and "blocks.0.ls1.gamma" in sd
    assert tuple(sd["pos_embed"].shape) == (1, 257, 3200) and not vit.pos_embed.requires_grad
    sd = mae.state_dict()
    assert len(mae.blocks) == 40 and tuple(sd["patch_embed.proj.weight"].shape) == (1408, 3, 2, 14, 14)
    assert "blocks.0.attn.q_bias" in sd and "blocks.0.attn.k_bias" not in sd and "blocks.0.ls1.gamma" not in sd
    assert 5.5e9 < count_params(vit) < 6.0e9 and 0.95e9 < count_params(mae) < 1.05e9


def test_toy_teacher_pretraining_lowers_both_losses_and_saves_official_layouts(toyworld, tmp_path):
    losses = {}
    clip_path, mae_path = pretrain_toy_teachers(toyworld, tmp_path, clip_steps=12, motion_steps=12, batch=16, lr=2e-3,
                                                log=lambda *a: None, history=losses, verbose=False)
    for name in ("clip", "motion"):
        first, last = sum(losses[name][:3]) / 3, sum(losses[name][-3:]) / 3
        assert last < first, (name, losses[name])
    assert "module" in torch.load(clip_path) and all(k.startswith("encoder.") for k in torch.load(mae_path)["model"])
    build_teachers("toy", "toy", clip_path, mae_path)


def test_video_teacher_attention_layouts_equal_explicit_references():
    """standard: each head's softmax over the tokens. official: the released teacher's call (SM/models/videomae.py:
    93-96), flash_attn_func on q, k, v permuted to (B, heads, N, hd) while it reads (batch, seqlen, heads, hd):
    written out below as that function defines it, position by position, then reshaped with no transpose back."""
    from model import Attention
    torch.manual_seed(0)
    B, N, H, hd = 2, 5, 4, 8
    D = H * hd
    std = Attention(D, H, qkv_bias="qv")
    for p in std.parameters():
        p.data.normal_(0, 0.3)
    off = OfficialVideoMAEAttention(D, H, qkv_bias="qv")
    off.load_state_dict(std.state_dict())
    x = torch.randn(B, N, D)
    bias = torch.cat([std.q_bias, torch.zeros(D), std.v_bias])
    q, k, v = (x @ std.qkv.weight.t() + bias).view(B, N, 3, H, hd).unbind(2)        # (B, N, H, hd) each
    proj = lambda y: y @ std.proj.weight.t() + std.proj.bias
    s = torch.einsum("bihd,bjhd->bhij", q, k) / hd ** 0.5
    ref_std = proj(torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(B, N, D))
    qf, kf, vf = (t.permute(0, 2, 1, 3) for t in (q, k, v))                        # (B, H, N, hd), as handed over
    out = torch.empty(B, H, N, hd)                                                 # flash: (batch, seqlen, heads, hd)
    for b in range(B):
        for n in range(N):                          # flash's head index runs over the tokens
            for i in range(H):                      # flash's sequence position runs over the heads
                w = torch.stack([qf[b, i, n] @ kf[b, j, n] for j in range(H)]) / hd ** 0.5
                out[b, i, n] = (w.softmax(0)[:, None] * vf[b, :, n]).sum(0)
    ref_off = proj(out.reshape(B, N, D))
    torch.testing.assert_close(std(x), ref_std)
    torch.testing.assert_close(off(x), ref_off)
    assert (std(x) - off(x)).abs().max() > 0.1
    # selectable for the video teacher by name, carried into every block
    cfg = MAE_TEACHER_PRESETS["toy"]
    assert all(type(b.attn) is OfficialVideoMAEAttention for b in VideoMAETeacher(cfg, "official").blocks)
    assert all(type(b.attn) is Attention for b in VideoMAETeacher(cfg).blocks)
    with pytest.raises(ValueError, match="mae_teacher_attention must be"):
        VideoMAETeacher(cfg, mae_teacher_attention="flash")
