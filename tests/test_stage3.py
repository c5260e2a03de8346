"""Stage 3: the LLM (KV cache, GQA, RoPE), LoRA, the answer-only loss, the instruction format,
frozen parts per sub-stage, the stage-2 hand-off, a short run, chat."""
import math
from dataclasses import asdict, replace

import pytest
import torch

from conftest import assert_picture
from data import ToyLLMTokenizer, WordPieceTokenizer, build_chat, video_index
from losses import answer_loss
from model import (LLM, LLM_PRESETS, LLMAttention, QFORMER_PRESETS, LoRALinear, Stage2Model, Stage3Model, add_lora,
                   apply_rope, audio_preset, count_params, generate, merge_lora, rope_tables, text_preset,
                   vision_preset)


def _llm(**kw):
    torch.manual_seed(0)
    return LLM(replace(LLM_PRESETS["toy"], vocab_size=60, **kw)).eval()


def test_generation_with_the_kv_cache_equals_recomputation():
    llm = _llm()
    emb = torch.randn(2, 5, 128)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])          # left padding in row 0
    out = generate(llm, emb, mask, max_new_tokens=6, eos_id=-1)
    seq, m = emb, mask                                               # from scratch: the whole sequence each step
    for t in range(6):
        logits, _ = llm(seq, m)
        nxt = logits[:, -1].argmax(-1)
        assert torch.equal(nxt, out[:, t])
        seq = torch.cat([seq, llm.embed_tokens(nxt)[:, None]], 1)
        m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
    first, _ = llm(emb[:1, 1:], None)                                 # padding changes nothing for row 0
    torch.testing.assert_close(llm(emb, mask)[0][0, -1], first[0, -1], atol=1e-5, rtol=1e-4)


def test_gqa_equals_standard_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    cfg = replace(LLM_PRESETS["toy"], vocab_size=10)
    gqa = LLMAttention(cfg)                                          # 4 query heads, 2 kv heads
    mha = LLMAttention(replace(cfg, kv_heads=cfg.heads))
    hd, rep = cfg.dim // cfg.heads, cfg.heads // cfg.kv_heads
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(cfg.kv_heads, hd, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(rep, 0).reshape(-1, cfg.dim))
    x = torch.randn(2, 7, cfg.dim)
    cos, sin = rope_tables(torch.arange(7)[None].expand(2, -1), hd, cfg.rope_theta)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(gqa(x, cos, sin, causal)[0], mha(x, cos, sin, causal)[0], atol=1e-5, rtol=1e-4)
    q = mha.q_proj(x).view(2, 7, cfg.heads, hd).transpose(1, 2)       # and MHA is the textbook formula
    k = mha.k_proj(x).view(2, 7, cfg.heads, hd).transpose(1, 2)
    v = mha.v_proj(x).view(2, 7, cfg.heads, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    s = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
    ref = mha.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(mha(x, cos, sin, causal)[0], ref, atol=1e-5, rtol=1e-4)


def test_rope_is_a_rotation_and_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    rot = lambda x, p: apply_rope(x, *rope_tables(torch.tensor([[p]]), 16, 10000.0))
    torch.testing.assert_close(rot(q, 37).norm(dim=-1), q.norm(dim=-1))
    dots = [(rot(q, m) * rot(k, n)).sum(-1) for m, n in ((5, 2), (15, 12), (103, 100))]
    torch.testing.assert_close(dots[0], dots[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dots[0], dots[2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(dots[0], (rot(q, 5) * rot(k, 4)).sum(-1))


def test_the_loss_ignores_every_non_answer_token(toyworld):
    tok = ToyLLMTokenizer(toyworld / "vocab.txt")
    ids, labels, mask, at = build_chat(tok, [("what color is the object?", "red")], 4, 40)
    assert at == video_index(tok) and [tok.itos[i] for i in ids[:at]] == ["<s>", "[INST]", "<Video>"]
    answer = labels[labels != -100].tolist()
    assert answer == tok.encode(" red") + [tok.eos_id]
    logits = torch.randn(1, 40, len(tok), requires_grad=True)
    answer_loss(logits, labels[None]).backward()
    touched = logits.grad.abs().sum(-1)[0] > 0                        # position j predicts token j + 1
    assert touched.nonzero().flatten().tolist() == [j - 1 for j in (labels != -100).nonzero().flatten().tolist()]


def test_merged_lora_equals_unmerged():
    torch.manual_seed(0)
    llm = add_lora(_llm(), r=4, alpha=8, dropout=0.1).eval()
    for m in llm.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)          # a trained adapter is not zero
    assert all(not p.requires_grad for n, p in llm.named_parameters() if "lora_" not in n)
    x = torch.randn(2, 6, 128)
    before, _ = llm(x)
    merged = merge_lora(llm)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x)[0], before, atol=1e-5, rtol=1e-4)


def test_mistral_7b_parameter_count_on_meta():
    with torch.device("meta"):
        llm = LLM(LLM_PRESETS["mistral-7b"])
    assert round(count_params(llm) / 1e9, 2) == 7.24
    assert tuple(llm.layers[0].self_attn.k_proj.weight.shape) == (1024, 4096)       # 8 KV heads of 128


def _stage3(vocab=40, llm_vocab=60):
    torch.manual_seed(0)
    return Stage3Model(vision_preset("toy"), replace(QFORMER_PRESETS["toy"], vocab_size=vocab),
                       replace(LLM_PRESETS["toy"], vocab_size=llm_vocab))


def test_frozen_parts_get_no_gradient_in_each_substage():
    from losses import stage3_objective
    B, Q = 3, 16
    batch = {"video": torch.randn(B, 3, 8, 32, 32), "idx": torch.arange(B), "pos_caption": torch.arange(B),
             "ids_caption": torch.randint(5, 40, (B, 6)), "mask_caption": torch.ones(B, 6, dtype=torch.long),
             "qf_ids": torch.randint(5, 40, (B, 5)), "qf_mask": torch.ones(B, 5, dtype=torch.long),
             "llm_ids": torch.randint(8, 60, (B, 30)), "llm_mask": torch.ones(B, 30, dtype=torch.long),
             "llm_labels": torch.full((B, 30), -100)}
    batch["llm_labels"][:, 25:] = batch["llm_ids"][:, 25:]
    model = _stage3()
    for sub in (1, 2, 3):
        if sub == 3:
            add_lora(model.llm)
        model.set_trainable(sub)
        model.zero_grad(set_to_none=True)
        loss, _ = stage3_objective(model, batch, substage=sub, video_at=3)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        frozen = [n for n in grads if (n.startswith("vision_encoder.") and sub == 1)
                  or (n.startswith("llm.") and "lora_" not in n)]
        assert frozen and all(grads[n] is None for n in frozen), sub
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(n.startswith(("qformer.", "vision_proj", "text_proj", "itm_head", "temp")) for n in trained) or sub > 1
        expect = {1: "qformer.layers.0.cross.k.weight", 2: "vision_encoder.blocks.0.attn.qkv.weight",
                  3: "llm.layers.0.self_attn.q_proj.lora_B.weight"}[sub]
        assert grads[expect] is not None and grads[expect].abs().sum() > 0, (sub, expect)


def test_weight_decay_sets_are_videochat2s():
    """Sub-stage 1 keeps the queries (and temp) out of weight decay, as VideoChat2's Q-Former model names them;
    sub-stages 2-3 name nothing, so only 1-D tensors and biases are exempt (pos_embed, cls_token, queries decayed)."""
    from common import build_optimizer
    model = _stage3()
    for sub in (1, 2, 3):
        model.set_trainable(sub)
        opt = build_optimizer(model, 1e-3, 0.02, (0.9, 0.999), 1e-8, model.no_weight_decay(sub))
        name = {p: n for n, p in model.named_parameters()}
        decayed, exempt = ({name[p] for p in g["params"]} for g in opt.param_groups)
        assert {n for n in exempt if model.get_parameter(n).ndim > 1 and not n.endswith(".bias")} == (
            {"qformer.query_tokens", "qformer.extra_query_tokens"} if sub == 1 else set()), sub
        assert "temp" in exempt and (sub == 1 or {"vision_encoder.pos_embed", "vision_encoder.cls_token",
                                                  "qformer.query_tokens"} <= decayed), sub


def test_old_option_spellings_still_work_and_say_their_new_name(capsys):
    from common import parse_config
    from train_stage3 import Stage3Config
    cfg = parse_config(Stage3Config(), ["--steps=(40,50,60)", "--frames=(2,2,4)", "--lrs=(1e-3,1e-3,2e-4)"])
    assert (cfg.max_steps, cfg.num_frames, cfg.lr) == ((40, 50, 60), (2, 2, 4), (1e-3, 1e-3, 2e-4))
    assert cfg.warmup_steps == (4, 5, 6)                                        # a tenth of each sub-stage
    assert capsys.readouterr().out.splitlines() == ["--steps is now --max_steps", "--frames is now --num_frames",
                                                    "--lrs is now --lr"]


def test_stage2_to_stage3_hand_off_loads_the_encoder(tmp_path):
    from checkpoints import load_video_encoder
    torch.manual_seed(0)
    vcfg2 = vision_preset("toy", num_frames=4)
    s2 = Stage2Model(vcfg2, text_preset("toy", vocab_size=40), audio_preset("toy"), 96, 96)
    torch.save({"stage": 2, "model": s2.state_dict(), "model_config": {"vision": asdict(vcfg2)}}, tmp_path / "s2.pt")
    model = _stage3()
    report = load_video_encoder(model, torch.load(tmp_path / "s2.pt", weights_only=False), log=lambda msg: None)
    assert report["skipped"] == sorted(k for k in s2.state_dict() if not k.startswith("vision_encoder."))
    src, enc = s2.vision_encoder.state_dict(), model.vision_encoder.state_dict()
    for k, v in enc.items():
        if k != "pos_embed":
            assert torch.equal(v, src[k]), k
    t4 = src["pos_embed"][0, 1:].view(4, 16, -1)
    assert enc["pos_embed"].shape == (1, 1 + 8 * 16, 96)
    torch.testing.assert_close(enc["pos_embed"][0, 1:].view(8, 16, -1)[0], t4[0])    # the ends stay put
    torch.testing.assert_close(enc["pos_embed"][0, 1:].view(8, 16, -1)[7], t4[3])


def test_short_run_lowers_the_loss_and_chat_answers(toyworld, toy_pretrained, tmp_path):
    from train_stage3 import main
    m = main([f"--data={toyworld}", f"--out_dir={tmp_path}", f"--qformer_bert={toy_pretrained['bert']}",
              f"--llm_ckpt={toy_pretrained['llm']}", "--max_steps=(15,15,15)", "--num_frames=(2,2,4)", "--max_llm_len=64", "--batch_size=8", "--log_every=1",
              "--eval_batch=16"])
    for sub in (1, 2, 3):
        assert m[f"substage{sub}_loss_last"] < m[f"substage{sub}_loss_first"], (sub, m)
    for key in ("qa_acc", "qa_chance", "caption_acc", "caption_chance", "qa_acc_color", "qa_chance_color"):
        assert 0.0 <= m[key] <= 1.0, key
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert_picture(tmp_path / "loss.png")
    # every sub-stage has its own random stream: sub-stage 3 alone from sub-stage 2's checkpoint = the same run
    alone = main([f"--data={toyworld}", f"--out_dir={tmp_path / 'alone'}", f"--qformer_bert={toy_pretrained['bert']}",
                  f"--llm_ckpt={toy_pretrained['llm']}", "--max_steps=(15,15,15)", "--num_frames=(2,2,4)", "--max_llm_len=64",
                  "--batch_size=8", "--substage=3", f"--init_from={tmp_path / 'substage2' / 'ckpt.pt'}", "--eval=False"])
    for key in ("substage3_loss_first", "substage3_loss_last"):
        assert alone[key] == pytest.approx(m[key], rel=1e-5), key
    # and LoRA dropout resumes exactly: 15 steps == 7 + --resume + 8, bit for bit
    part = lambda *x: main([f"--data={toyworld}", f"--out_dir={tmp_path / 'part'}", f"--qformer_bert={toy_pretrained['bert']}",
                            f"--llm_ckpt={toy_pretrained['llm']}", "--max_steps=(15,15,15)", "--num_frames=(2,2,4)",
                            "--max_llm_len=64", "--batch_size=8", "--substage=3", "--eval=False",
                            f"--init_from={tmp_path / 'substage2' / 'ckpt.pt'}", *x])
    part("--stop_after=7")
    part("--resume")
    a, b = (torch.load(d / "substage3" / "ckpt.pt", weights_only=False) for d in (tmp_path / "alone", tmp_path / "part"))
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []
    import chat
    answer = chat.main([f"--ckpt={tmp_path / 'ckpt.pt'}", f"--video={toyworld / 'videos' / 'val_00000.webp'}",
                        "--question=what color is the object?", "--max_new_tokens=4"])
    assert isinstance(answer, str)
    from common import ConfigError
    with pytest.raises(ConfigError, match="stage-2"):
        torch.save({"stage": 2}, tmp_path / "s2.pt")
        chat.main([f"--ckpt={tmp_path / 's2.pt'}", f"--video={toyworld / 'videos' / 'val_00000.webp'}", "--question=x"])


def test_multi_turn_instruction_data(toyworld):
    import numpy as np
    from data import DataError, stage3_turns
    tok = ToyLLMTokenizer(toyworld / "vocab.txt")
    rec = {"caption": "a red circle", "conversations": [{"q": "what color is the object?", "a": "red"},
                                                        {"q": "what shape is the object?", "a": "circle"}]}
    turns = stage3_turns(rec, 3, np.random.default_rng(0))
    assert turns == [("what color is the object?", "red"), ("what shape is the object?", "circle")]
    assert stage3_turns(rec, 2, np.random.default_rng(0))[0][1] == "a red circle"      # sub-stage 2: captions
    ids, labels, mask, _ = build_chat(tok, turns, 4, 64)
    answers = [tok.itos[i] for i in labels[labels != -100].tolist()]
    assert answers == ["red", "</s>", "circle", "</s>"]
    with pytest.raises(DataError, match="conversations"):
        stage3_turns({"caption": "x", "conversations": [{"question": "?"}]}, 3, np.random.default_rng(0))


@pytest.mark.parametrize("substage", [1, 3])
def test_fsdp_under_torchrun_writes_a_full_checkpoint(toyworld, toy_pretrained, tmp_path, substage):
    """Sub-stage 1 (a replicated scalar temperature beside the shards) and 3 (LoRA on a sharded LLM)
    with FSDP2 on 2 gloo ranks: the run finishes and its checkpoint is whole, loadable by one process.
    A rank that aborts at interpreter exit after finishing is tolerated (see conftest)."""
    import subprocess
    import sys
    from pathlib import Path
    from model import Stage3Model
    steps = {1: "(2,0,0)", 3: "(0,0,2)"}[substage]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve().parents[1] / "train_stage3.py"), f"--data={toyworld}",
           f"--out_dir={tmp_path}", f"--qformer_bert={toy_pretrained['bert']}", f"--llm_ckpt={toy_pretrained['llm']}",
           f"--substage={substage}", f"--max_steps={steps}", "--fsdp", "--batch_size=4", "--workers=0", "--log_every=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    ck_path = tmp_path / "ckpt.pt"
    assert ck_path.exists(), r.stdout[-2000:] + r.stderr[-4000:]
    assert "step 2/2" in (tmp_path / f"substage{substage}" / "log.txt").read_text()
    ck = torch.load(ck_path, weights_only=False)
    model = Stage3Model.from_config(ck["model_config"])
    model.load_state_dict(ck["model"])                                    # full tensors, every key
    assert all(type(v) is torch.Tensor for v in ck["model"].values())
    assert (substage == 3) == any("lora_" in k for k in ck["model"])


def _videochat2_file(model, peft_prefix="mistral_model.", proj="mistral_proj"):
    """A stage-3 file written as VideoChat2 writes it (VC2/models/videochat_mistra/videochat2_it_mistral.py:57-156;
    VC2/tasks/train_it.py:180-187: the trainable tensors only, in {'model': ...}), names spelled out by hand from
    the BLIP-2 Q-Former (VC2/models/blip2/Qformer.py:52-66, 293-421) and PEFT's LoRA wrapping of a Hugging Face
    MistralForCausalLM, sizes shrunk to the toy presets."""
    sd, q = model.state_dict(), {}
    q["qformer.bert.embeddings.word_embeddings.weight"] = torch.cat([sd["qformer.word_emb.weight"],
                                                                     torch.randn(1, 96)])   # + [DEC] (blip2.py:28)
    q["qformer.bert.embeddings.position_embeddings.weight"] = sd["qformer.pos_emb.weight"]
    q["qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]                      # a persistent buffer
    for t in ("weight", "bias"):
        q[f"qformer.bert.embeddings.LayerNorm.{t}"] = sd[f"qformer.emb_norm.{t}"]
    for i in range(model.qformer.cfg.depth):
        L, o = f"qformer.bert.encoder.layer.{i}.", f"qformer.layers.{i}."
        attns = [("attention", "attn")] + ([("crossattention", "cross")] if i % 2 == 0 else [])
        for theirs, ours in attns:
            for t in ("weight", "bias"):
                for a, b in (("query", "q"), ("key", "k"), ("value", "v")):
                    q[f"{L}{theirs}.self.{a}.{t}"] = sd[f"{o}{ours}.{b}.{t}"]
                q[f"{L}{theirs}.output.dense.{t}"] = sd[f"{o}{ours}.o.{t}"]
                q[f"{L}{theirs}.output.LayerNorm.{t}"] = sd[f"{o}{ours}_norm.{t}"]
        for t in ("weight", "bias"):
            for suffix, s in (("", ""), ("_query", "_q")):
                q[f"{L}intermediate{suffix}.dense.{t}"] = sd[f"{o}fc1{s}.{t}"]
                q[f"{L}output{suffix}.dense.{t}"] = sd[f"{o}fc2{s}.{t}"]
                q[f"{L}output{suffix}.LayerNorm.{t}"] = sd[f"{o}ffn_norm{s}.{t}"]
    q["query_tokens"], q["extra_query_tokens"] = sd["qformer.query_tokens"], sd["qformer.extra_query_tokens"]
    for t in ("weight", "bias"):
        q[f"{proj}.{t}"] = sd[f"llm_proj.{t}"]
        q[f"vision_layernorm.{t}"] = sd[f"vision_layernorm.{t}"]
    q.update({f"vision_encoder.{k[len('vision_encoder.'):]}": v for k, v in sd.items() if k.startswith("vision_encoder.")})
    for k, v in sd.items():                       # llm.layers.0.self_attn.q_proj.lora_A.weight -> PEFT's name
        if ".lora_" in k:
            hf = k[len("llm."):].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            hf = hf if hf.startswith("lm_head") else "model." + hf
            q[f"{peft_prefix}base_model.model.{hf}"] = v
    return {"model": q, "config": {"model": {"lora_alpha": 8}}, "epoch": 2}


@pytest.mark.parametrize("layout", [("mistral_model.", "mistral_proj"), ("lm.", "project_up")])
def test_videochat2_file_loads_completely_and_computes_the_same(layout):
    from checkpoints import checkpoint_kind, load_videochat2
    src = _stage3(vocab=40)
    add_lora(src.llm, r=4, alpha=8)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if ".lora_B." in n or "vision_layernorm" in n:
                p.normal_(std=0.1)                                        # trained adapters, a trained norm
    ck = _videochat2_file(src, *layout)
    assert checkpoint_kind(ck) == "VideoChat2 / InternVideo2-Chat file"
    dst = _stage3(vocab=40)
    torch.manual_seed(1)
    dst.qformer.query_tokens.data.normal_()                               # make sure nothing is left as it was
    base = {k.replace(".base.", "."): v for k, v in src.llm.state_dict().items() if ".lora_" not in k}
    dst.llm.load_state_dict(base)                                         # the frozen LLM: --llm_ckpt's part
    logs = []
    report = load_videochat2(dst, ck, log=logs.append)
    assert set(report["loaded"]) | set(report["skipped"]) == set(ck["model"])          # every key consumed or named
    assert report["skipped"] == ["qformer.bert.embeddings.position_ids"]
    assert report["vision"] == "loaded"
    assert set(report["fresh"]) == {"qformer.lm_dense.weight", "qformer.lm_dense.bias", "qformer.lm_norm.weight",
                                    "qformer.lm_norm.bias", "qformer.lm_bias", "vision_proj.weight", "vision_proj.bias",
                                    "text_proj.weight", "text_proj.bias", "itm_head.weight", "itm_head.bias", "temp"}
    assert any("extra rows are dropped" in m for m in logs) and any("r=4, alpha=8" in m for m in logs)
    src.eval(), dst.eval()
    video, ids = torch.randn(2, 3, 8, 32, 32), torch.randint(5, 40, (2, 6))
    with torch.no_grad():
        a = src.visual_embeds(src.video_tokens(video), ids, torch.ones_like(ids))
        b = dst.visual_embeds(dst.video_tokens(video), ids, torch.ones_like(ids))
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        emb = torch.randn(2, 5, 128)
        torch.testing.assert_close(src.llm(emb)[0], dst.llm(emb)[0], atol=0, rtol=0)      # the LoRA, lm_head's too


def test_videochat2_file_missing_parts_are_refused_by_name():
    from checkpoints import load_videochat2
    from common import CheckpointError
    src = _stage3(vocab=40)
    add_lora(src.llm, r=4, alpha=8)
    ck = _videochat2_file(src)
    del ck["model"]["mistral_model.base_model.model.lm_head.lora_B.default.weight"]
    with pytest.raises(CheckpointError, match=r"lacks LoRA adapters: llm\.lm_head\.lora_B\.weight"):
        load_videochat2(_stage3(vocab=40), ck, log=lambda m: None)
    ck = _videochat2_file(src)
    ck["model"]["mistral_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"mistral_proj\.weight \(3, 3\)"):
        load_videochat2(_stage3(vocab=40), ck, log=lambda m: None)
    with pytest.raises(CheckpointError, match="not a VideoChat2"):
        load_videochat2(_stage3(vocab=40), {"model": {"foo.weight": torch.zeros(1)}}, log=lambda m: None)
