"""checkpoints.py: checkpoints in, our modules out, and a report of every key that was not used.

  load_video_encoder   the one hand-off between stages: the InternVideo2 encoder of a stage-1, 2 or 3
                       checkpoint (ours or released) into a stage-2 or stage-3 model, its table resized in time
  stage1_student_state  --init_from for stage 1: our stage-1 checkpoint or the released pre-training module
  bert_key_map / load_bert      Hugging Face / official BERT (`BertForMaskedLM`) into TextEncoder
  load_beats                    the official BEATs checkpoint ({'cfg', 'model'}) into AudioEncoder
  load_official_stage2          a released InternVideo2 stage-2 file (1B video-text, 6B audio-visual) into a
                                Stage2Model, the architecture read from the file's shapes
  qformer_key_map / qformer_from_bert   the BLIP-2 Q-Former's names; a BERT of the same width into the Q-Former
                                (VideoChat2's start)
  llm_key_map / load_llm        Hugging Face Mistral / LLaMA into LLM
  load_videochat2               a released VideoChat2 / InternVideo2-Chat stage-3 file (Q-Former, queries,
                                projection, LoRA) into a Stage3Model
  init_stage3                   stage 3's --init_from and --vision_from: which of the above a file needs
  check_fits                    the one test that a file's tensors fit a module: missing and mis-shaped ones
                                refused by name (teachers.load_teacher and chat.py use it too)

model.py holds the networks; this file holds how other people's files map onto them. The teachers'
own layouts load in teachers.py (load_teacher).
"""
import re
import tempfile
from pathlib import Path

from common import CheckpointError, ConfigError, check, load_checkpoint
from data import WordPieceTokenizer, load_llm_tokenizer
from model import (AUDIO_PRESETS, TEXT_PRESETS, VISION_PRESETS, AudioEncoder, Stage2Model, Stage3Model, TextConfig,
                   add_lora, audio_preset, interpolate_pos_embed_time, merge_lora, restore_lora, text_preset,
                   vision_preset)


# The toy stand-ins for the downloaded checkpoints (the two teachers, BERT, the LLM), trained on ToyWorld and
# shipped with the repository; `python pretrain_toys.py --out=toys` rebuilds all four (README).
TOYS = Path(__file__).resolve().parent / "toys"


def released_state(ck):
    """The state dict inside a released file: flat, or wrapped by DeepSpeed in `module` or by the official savers
    in `model` (teachers, stage-1 and stage-2 checkpoints alike)."""
    return ck.get("module", ck.get("model", ck)) if isinstance(ck, dict) else ck


def checkpoint_kind(ck):
    """What a loaded file is, in words, from its own keys: 'stage-N checkpoint' (ours), 'released stage-1 module',
    'released stage-2 file', 'VideoChat2 / InternVideo2-Chat file', 'teacher', 'BERT', 'BEATs', 'LLM', or 'unknown'."""
    if not isinstance(ck, dict):
        return "unknown"
    if ck.get("stage") in (1, 2, 3):
        return f"stage-{ck['stage']} checkpoint"
    if "cfg" in ck and "model" in ck and any(k.startswith("post_extract_proj") for k in ck["model"]):
        return "BEATs"
    state = released_state(ck)
    if not isinstance(state, dict) or not state:
        return "unknown"
    has = lambda *names: any(k.startswith(names) for k in state)
    if "query_tokens" in state and has("qformer."):
        return "VideoChat2 / InternVideo2-Chat file"
    if has("vision_encoder.") and has("text_encoder."):
        return "released stage-2 file"
    if "patch_embed.proj.weight" in state and has("clip_decoder.", "final_clip_decoder.", "mae_decoder."):
        return "released stage-1 module"
    if "patch_embed.proj.weight" in state or has("encoder.patch_embed."):
        return "teacher"
    if has("bert.embeddings.", "embeddings.word_embeddings."):
        return "BERT"
    if has("model.embed_tokens."):
        return "LLM"
    return "unknown"


def check_init_from(ck, path, accepted, stage, option="--init_from"):
    """Refuse, in one line, an --init_from file of a kind this stage does not start from (ConfigError)."""
    kind = checkpoint_kind(ck)
    if kind not in accepted:
        raise ConfigError(f"{option}={path} is a {kind}; stage {stage} starts from a " + " or a ".join(accepted))
    return kind


def key_names(keys):
    """Keys with their block indices folded, for one-line reports: 'blocks.*.attn.qkv.weight (x40)'."""
    groups = {}
    for k in keys:
        g = re.sub(r"(?<=\.)\d+(?=\.)", "*", k)
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} (x{n})" if n > 1 else g for g, n in groups.items()) or "none"


def check_fits(own, state, source, what, strict=False):
    """The one test of a file's tensors against a module's (own: its state_dict()): every tensor of `own` must be in
    `state` with its shape, else CheckpointError naming the missing keys and the mis-shaped ones with both shapes.
    Returns the keys of `state` the module does not have, for the caller to name as ignored; strict=True (a checkpoint
    this code wrote for this very model) refuses them too."""
    missing = [k for k in own if k not in state]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    unexpected = sorted(k for k in state if k not in own)
    if missing or shapes or (strict and unexpected):
        shapes = ", ".join(shapes[:10]) + (" ..." if len(shapes) > 10 else "") or "none"
        named = key_names(missing)          # block indices folded; where that hides which block, the names too
        if missing and named != ", ".join(missing):
            named += f" (that is, missing {missing[:10]}{' ...' if len(missing) > 10 else ''})"
        raise CheckpointError(f"{source}: its weights do not fit {what}: missing {named}; "
                              + (f"unexpected {key_names(unexpected)}; " if strict else "") + f"other shapes {shapes}")
    return unexpected


def load_video_encoder(model, ck, source="checkpoint", log=print):
    """The stage hand-off (MM/models/backbones/internvideo2/internvideo2.py:715-719): the video encoder of a stage-1
    checkpoint (the student itself, flat keys) or of a stage-2/3 one (under `vision_encoder.`) into
    model.vision_encoder, the position table linearly interpolated in time to the encoder's frame count (stage 1 -> 2:
    8 -> 4 frames; 2 -> 3: 4 -> 8). Every encoder weight must be there with its shape (check_fits).
    ck: a loaded checkpoint dict. Logs, and returns, every checkpoint key it skips and every model
    key it leaves fresh: {"loaded", "skipped", "fresh"}, lists of names."""
    enc = model.vision_encoder
    own = enc.state_dict()
    stage = ck.get("stage")
    raw = ck["model"] if stage else released_state(ck)
    prefix = "" if stage == 1 or (not stage and "patch_embed.proj.weight" in raw) else "vision_encoder."
    state = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    mc = ck.get("model_config", {})
    vc = mc.get("vision") or mc                                  # stage 2/3 nest it, stage 1 does not
    tub = vc.get("tubelet_size", enc.cfg.tubelet_size)
    t_new, hw = enc.cfg.grid[0], enc.cfg.grid[1] * enc.cfg.grid[2]
    if "num_frames" in vc:
        t_old = vc["num_frames"] // tub
    else:                                                        # a released file: its table's length says
        t_old = (state["pos_embed"].shape[1] - 1) // hw if "pos_embed" in state else t_new
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed_time(state["pos_embed"], t_old, t_new)
    check_fits(own, state, source, "the video encoder")
    enc.load_state_dict({k: state[k] for k in own})
    skipped = sorted(k for k in raw if not k.startswith(prefix) or k[len(prefix):] not in own)
    fresh = sorted(k for k in model.state_dict() if not k.startswith("vision_encoder."))
    part = lambda k: k.split(".")[0] + (".*" if "." in k else "")                     # other networks: by part
    names = [k if k.startswith(prefix) else part(k) for k in skipped]
    kind = f"stage-{stage}" if stage else "released"
    log(f"{kind} hand-off from {source}: loaded all {len(own)} video-encoder tensors (pos_embed {t_old} -> "
        f"{t_new} frames); skipped {len(skipped)} keys: {key_names(names)}; not from this checkpoint: "
        f"{key_names(part(k) for k in fresh)}")
    return {"loaded": sorted(own), "skipped": skipped, "fresh": fresh}


def stage1_student_state(student, ck, source="checkpoint", log=print):
    """--init_from for stage 1: the student's tensors from our stage-1 checkpoint or from the released pre-training
    module (official key names, decoders included; flat, or wrapped by DeepSpeed in `module` or `model`). Every
    student tensor must be there with its shape (KeyError naming the misfits); keys it does not use are logged by
    name. Returns the state dict to load (common.load_state, which also re-shards under FSDP)."""
    stage = ck.get("stage")
    if stage not in (None, 1):
        raise CheckpointError(f"{source} is a stage-{stage} checkpoint; stage 1 starts from a stage-1 one")
    raw = ck["model"] if stage == 1 else released_state(ck)
    own = student.state_dict()
    skipped = check_fits(own, raw, source, "the stage-1 student")
    log(f"student from {source}: all {len(own)} tensors; ignored {len(skipped)} keys: {key_names(skipped)}")
    return {k: raw[k] for k in own}


def bert_key_map(cfg: TextConfig):
    """{our key: official key} for a `BertForMaskedLM` state dict (Hugging Face `bert-*-uncased`, and
    the stage-2 checkpoints' `text_encoder.` part; MM/models/backbones/bert/xbert.py:599-611, 1592-1603).
    Cross-attention exists only in layers >= fusion_layer and is new (random) when loading a plain BERT."""
    m = {"word_emb.weight": "bert.embeddings.word_embeddings.weight",
         "pos_emb.weight": "bert.embeddings.position_embeddings.weight",
         "type_emb.weight": "bert.embeddings.token_type_embeddings.weight",
         "emb_norm.weight": "bert.embeddings.LayerNorm.weight", "emb_norm.bias": "bert.embeddings.LayerNorm.bias",
         "mlm_dense.weight": "cls.predictions.transform.dense.weight",
         "mlm_dense.bias": "cls.predictions.transform.dense.bias",
         "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
         "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias", "mlm_bias": "cls.predictions.bias"}
    names = {"attn": "attention", "cross": "crossattention"}
    for i in range(cfg.depth):
        p = f"bert.encoder.layer.{i}."
        for ours, theirs in names.items():
            if ours == "cross" and i < cfg.fusion_layer:
                continue
            for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
                for t in ("weight", "bias"):
                    m[f"layers.{i}.{ours}.{a}.{t}"] = f"{p}{theirs}.self.{b}.{t}"
            for t in ("weight", "bias"):
                m[f"layers.{i}.{ours}.o.{t}"] = f"{p}{theirs}.output.dense.{t}"
                m[f"layers.{i}.{ours}_norm.{t}"] = f"{p}{theirs}.output.LayerNorm.{t}"
        for t in ("weight", "bias"):
            m[f"layers.{i}.fc1.{t}"] = f"{p}intermediate.dense.{t}"
            m[f"layers.{i}.fc2.{t}"] = f"{p}output.dense.{t}"
            m[f"layers.{i}.ffn_norm.{t}"] = f"{p}output.LayerNorm.{t}"
    return m


def load_bert(text_encoder, state, prefix="", used=None):
    """Load an official/Hugging Face BERT state dict (keys after `prefix`) through bert_key_map, with or
    without the `bert.` prefix and with the legacy `LayerNorm.gamma`/`.beta` names. Shapes must match
    (KeyError naming each mismatch). Returns the list of our keys the checkpoint did not have (the new
    cross-attention when loading a plain BERT), so callers can report them; `used` (a set) collects the
    checkpoint keys it read."""
    own = text_encoder.state_dict()
    fresh, bad, new = [], [], {}
    for ours, theirs in bert_key_map(text_encoder.cfg).items():
        names = [theirs]
        if theirs.startswith("bert."):                  # `text_encoder.X` renaming (MM/tasks/shared_utils.py:165-168)
            names.append(theirs[len("bert."):])
        if ".LayerNorm." in theirs:                     # the original bert-*-uncased files: LayerNorm.gamma / .beta
            names += [n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                      for n in names]
        name = next((prefix + n for n in names if prefix + n in state), None)
        src = None if name is None else state[name]
        if used is not None and name is not None:
            used.add(name)
        if src is None:
            fresh.append(ours)
        elif src.shape != own[ours].shape:
            bad.append(f"{prefix + theirs}: {tuple(src.shape)} vs {tuple(own[ours].shape)}")
        else:
            new[ours] = src
    if bad:
        raise CheckpointError(f"BERT checkpoint does not fit: {bad[:10]}")
    text_encoder.load_state_dict(new, strict=False)
    return fresh


def load_beats(state_or_ckpt, prefix="", base="beats-base"):
    """Build an AudioEncoder from an official BEATs checkpoint ({'cfg': ..., 'model': state}) or from the keys under
    `prefix` of another file (the 6B stage-2 checkpoint's `audio_encoder.`, which has no cfg: the `base` preset), and
    load it; missing or mis-shaped keys raise KeyError naming them, and so does a cfg that asks for what AudioEncoder
    does not build (pre-LN `layer_norm_first`, a patch-embedding `conv_bias`, another `activation_fn`): refused,
    never half-loaded."""
    ck = state_or_ckpt
    state, ocfg = ck.get("model", ck), ck.get("cfg", {}) or {}
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    refused = [f"{k}={ocfg[k]!r}" for k, ours in (("layer_norm_first", False), ("conv_bias", False),
                                                   ("activation_fn", "gelu")) if k in ocfg and ocfg[k] != ours]
    if refused:
        raise CheckpointError(f"the BEATs cfg asks for {', '.join(refused)}, which this AudioEncoder does not build "
                       f"(post-LN deep-norm layers, no patch bias, GELU)")
    names = {"encoder_embed_dim": "dim", "encoder_layers": "depth", "encoder_attention_heads": "heads",
             "encoder_ffn_embed_dim": "mlp_dim", "embed_dim": "patch_dim", "input_patch_size": "patch",
             "conv_pos": "pos_conv", "conv_pos_groups": "pos_conv_groups", "deep_norm": "deep_norm",
             "num_buckets": "num_buckets", "max_distance": "max_distance", "gru_rel_pos": "gru_rel_pos"}
    over = {ours: ocfg[theirs] for theirs, ours in names.items() if theirs in ocfg}
    if ocfg.get("relative_position_embedding") is False:
        over["num_buckets"] = 0
    enc = AudioEncoder(audio_preset(base, **over))
    state = {k.replace("encoder.pos_conv.0.", "encoder.pos_conv.")
              .replace("encoder.layers.0.self_attn.relative_attention_bias", "encoder.relative_attention_bias"): v
             for k, v in state.items() if ".relative_attention_bias" not in k or "layers.0." in k}
    own = enc.state_dict()
    check_fits(own, state, "the BEATs checkpoint", "the audio encoder")
    enc.load_state_dict({k: state[k] for k in own})
    return enc


def qformer_key_map(cfg):
    """{our Q-Former key: official key} in the BLIP-2 Q-Former's names (VC2/models/blip2/Qformer.py:52-66, 397-421;
    `BertLMHeadModel` under `bert.`): embeddings, per layer self-attention, cross-attention (layers 0, 2, ...), the
    text FFN (`intermediate`, `output`) and the query FFN (`intermediate_query`, `output_query`), and the MLM head
    (`cls.`, which VideoChat2 deletes). The queries live outside the Q-Former there (`query_tokens`, `extra_query_tokens`)."""
    text = bert_key_map(text_preset("bert-base", depth=cfg.depth, fusion_layer=0))   # cross-attention in every layer
    m = {}
    for ours, theirs in text.items():
        if ours == "type_emb.weight" or ".cross" in ours and int(ours.split(".")[1]) % cfg.cross_every:
            continue                                           # BLIP-2's embeddings have no token types
        m[ours.replace("mlm_", "lm_")] = theirs
        if ours.startswith("layers.") and (".fc" in ours or "ffn_norm" in ours):
            parts = ours.split(".")                            # layers.i.fc1.weight -> layers.i.fc1_q.weight
            m[".".join(parts[:2] + [parts[2] + "_q"] + parts[3:])] = (
                theirs.replace(".intermediate.", ".intermediate_query.").replace(".output.", ".output_query."))
    return m


def qformer_from_bert(qformer, hf_state, log=print):
    """Initialise the Q-Former from a BERT state dict of the same width (Hugging Face names), as
    VideoChat2 starts from bert-base-uncased (VC2/models/blip2/blip2.py:53-67): embeddings, self-attention, FFN
    (copied to the query FFN too: BERT has one) and the MLM head of layer i go to Q-Former layer i; cross-attention
    and queries stay fresh. Logs the keys it ignores; returns the Q-Former keys left fresh."""
    own, new, used = qformer.state_dict(), {}, set()
    for ours, theirs in qformer_key_map(qformer.cfg).items():
        theirs = theirs.replace("_query.", ".")               # a plain BERT: the query FFN starts as the text FFN
        if ".cross" in ours or theirs not in hf_state:
            continue
        if hf_state[theirs].shape != own[ours].shape:
            raise CheckpointError(f"BERT file does not fit the Q-Former: {theirs} {tuple(hf_state[theirs].shape)} "
                           f"vs {tuple(own[ours].shape)}")
        new[ours] = hf_state[theirs]
        used.add(theirs)
    qformer.load_state_dict(new, strict=False)
    fresh = sorted(set(own) - set(new))
    ignored = sorted(k for k in hf_state if k not in used)
    log(f"Q-Former from BERT: {len(new)} tensors; left fresh {len(fresh)}: {key_names(fresh)}; "
        f"ignored {len(ignored)}: {key_names(ignored)}")
    return fresh


def llm_key_map(llm):
    """{our key: Hugging Face Mistral/LLaMA key}: the same names under `model.`, except lm_head."""
    return {k: (k if k.startswith("lm_head") else "model." + k) for k in llm.state_dict()}


def load_llm(llm, state, log=print):
    """Load a Hugging Face Mistral/LLaMA state dict (e.g. the merged safetensors of Mistral-7B) into an LLM without
    LoRA; missing or mis-shaped tensors are refused by their Hugging Face names (check_fits), keys it does not use
    (older files' rotary `inv_freq` buffers, say) are logged by name."""
    own, names = llm.state_dict(), llm_key_map(llm)
    ignored = check_fits({names[k]: v for k, v in own.items()}, state, "the LLM checkpoint", "the LLM")
    llm.load_state_dict({k: state[names[k]] for k in own})
    log(f"LLM: all {len(own)} tensors; ignored {len(ignored)}: {key_names(ignored)}")


# The released stage-3 layouts: VideoChat2's own (Ask-Anything, VC2/models/videochat_mistra/videochat2_it_mistral.py:
# 57-156) and InternVideo2-Chat's (the modeling_base.py published with the model on the Hugging Face Hub, read in a
# public copy: the same Q-Former and queries, `project_up` for `mistral_proj`, `lm.` for `mistral_model.`). Both save
# only the trainable tensors (VC2/tasks/train_it.py:180-187): no frozen LLM weights, so those come from --llm_ckpt.
STAGE3_LAYOUTS = {"VideoChat2": {"proj": "mistral_proj", "llm": "mistral_model."},
                  "InternVideo2-Chat": {"proj": "project_up", "llm": "lm."}}


def load_videochat2(model, ck, log=print):
    """A released VideoChat2 / InternVideo2-Chat stage-3 file ({'model': state} or flat) into our Stage3Model:
    the Q-Former (qformer_key_map under `qformer.`; a vocabulary with extra rows, VideoChat2's added [DEC], is cut to
    ours and said so), the 32 + 64 queries, the projection to the LLM (-> llm_proj), vision_layernorm, the video
    encoder when it is an InternVideo2 one (load_video_encoder; VideoChat2's own UMT-L encoder is reported, and the
    caller must give the encoder another way), and the LLM's PEFT LoRA adapters
    (`<llm>base_model.model.<HF key>.lora_{A,B}.default.weight`), added to our LLM with the file's rank and the
    alpha of the file's config (32 when it has none: config_7b_stage3.py:81). Returns {"loaded", "skipped", "fresh",
    "vision"}. A missing required part or a mis-shaped tensor raises KeyError naming it."""
    state = released_state(ck)
    layout = next((n for n, l in STAGE3_LAYOUTS.items() if f"{l['proj']}.weight" in state), None)
    if layout is None or "query_tokens" not in state:
        parts = sorted({k.split(".")[0] for k in state}) if isinstance(state, dict) else []
        raise CheckpointError(f"not a VideoChat2 / InternVideo2-Chat stage-3 file (no query_tokens and mistral_proj / "
                       f"project_up); its top-level parts: {parts[:12]}")
    names = STAGE3_LAYOUTS[layout]
    own, new, used = model.state_dict(), {}, set()

    def take(ours, theirs, cut_rows=False):
        src = state[theirs]
        if cut_rows and src.shape[0] > own[ours].shape[0] and src.shape[1:] == own[ours].shape[1:]:
            log(f"{theirs}: {src.shape[0]} rows, our vocabulary {own[ours].shape[0]}: the extra rows are dropped")
            src = src[:own[ours].shape[0]]
        if src.shape != own[ours].shape:
            raise CheckpointError(f"{layout} file does not fit: {theirs} {tuple(src.shape)} vs {tuple(own[ours].shape)}")
        new[ours] = src
        used.add(theirs)

    for ours, theirs in qformer_key_map(model.qformer.cfg).items():
        if "qformer." + theirs in state:
            take("qformer." + ours, "qformer." + theirs, cut_rows=ours == "word_emb.weight")
    missing = [k for k in ("query_tokens", "extra_query_tokens", "layers.0.attn.q.weight", "layers.0.cross.k.weight")
               if "qformer." + k not in new and k not in state]
    if missing:
        raise CheckpointError(f"{layout} file lacks Q-Former parts: {missing}")
    for k in ("query_tokens", "extra_query_tokens"):
        take(f"qformer.{k}", k)
    for t in ("weight", "bias"):
        take(f"llm_proj.{t}", f"{names['proj']}.{t}")
        if f"vision_layernorm.{t}" in state:
            take(f"vision_layernorm.{t}", f"vision_layernorm.{t}")

    # LoRA: r from the file's first adapter, alpha from its config
    peft = names["llm"] + "base_model.model."
    lora = {k[len(peft):]: k for k in state if k.startswith(peft) and ".lora_" in k}
    if lora:
        r = next(v for k, v in lora.items() if ".lora_A." in k)
        r = state[r].shape[0]
        conf = ck.get("config", {}) if isinstance(ck, dict) else {}
        alpha = (conf.get("model", {}) or {}).get("lora_alpha", 32) if isinstance(conf, dict) else 32
        if not any("lora_" in k for k in own):
            add_lora(model.llm, r=r, alpha=alpha)
            own = model.state_dict()
        for hf_key, k in lora.items():
            ours = "llm." + hf_key.replace(".default.", ".")
            ours = ours.replace("llm.model.", "llm.", 1)            # our LLM has no `model.` level (llm_key_map)
            if ours not in own:
                raise CheckpointError(f"{layout} file: LoRA adapter {k} has no place in our LLM (targets: q/k/v/o, gate/up/down, "
                               f"lm_head)")
            take(ours, k)
        no_adapter = sorted(k for k in own if ".lora_" in k and k not in new)
        if no_adapter:
            raise CheckpointError(f"{layout} file lacks LoRA adapters: {key_names(no_adapter)}")
        log(f"{layout} LoRA: {len(lora)} adapter tensors, r={r}, alpha={alpha}")

    # the video encoder, when it is an InternVideo2 one
    model.load_state_dict(new, strict=False)
    done, vision = set(new), "absent"
    if "vision_encoder.patch_embed.proj.weight" in state and "vision_encoder.blocks.0.attn.qkv.weight" in state:
        report = load_video_encoder(model, {"model": state}, f"the {layout} file", log=log)
        used |= {f"vision_encoder.{k}" for k in report["loaded"]}
        done |= {f"vision_encoder.{k}" for k in report["loaded"]}
        vision = "loaded"
    elif any(k.startswith("vision_encoder.") for k in state):
        vision = "not InternVideo2"
    # fresh: what neither this file nor --llm_ckpt gives (the LLM's base weights come from there)
    fresh = sorted(k for k in own if k not in done and (not k.startswith("llm.") or ".lora_" in k))
    skipped = sorted(k for k in state if k not in used)
    log(f"{layout} stage-3 file: loaded {len(used)} tensors; video encoder {vision}; left fresh {len(fresh)}: "
        f"{key_names(fresh)}; ignored {len(skipped)}: {key_names(skipped)}")
    return {"loaded": sorted(used), "skipped": skipped, "fresh": fresh, "vision": vision}


def init_stage3(model, init_from, vision_from="", log=print):
    """Stage 3's --init_from and --vision_from, read here and nowhere else. --init_from is one of
      a stage-2 checkpoint or a released stage-2 file   its video encoder (load_video_encoder: the hand-off, the table
                                                        resized in time)
      a stage-3 checkpoint                              the whole model at its own frame count, LoRA included when it
                                                        has it (the sub-stage loop then resizes the table, as a run
                                                        that did the earlier sub-stages in one go)
      a VideoChat2 / InternVideo2-Chat file             Q-Former, queries, projection, LoRA, and the video encoder when
                                                        it is an InternVideo2 one (load_videochat2); else --vision_from
                                                        must give it
    --vision_from (a stage-2 or 3 file) then replaces the video encoder. Returns {path: the kind of file it was}."""
    loaded = {}
    if init_from:
        ck = load_checkpoint(init_from)
        kind = check_init_from(ck, init_from, ("stage-2 checkpoint", "stage-3 checkpoint", "released stage-2 file",
                                               "VideoChat2 / InternVideo2-Chat file"), stage=3)
        if kind == "stage-3 checkpoint":
            mc = ck["model_config"]
            if mc.get("lora"):
                restore_lora(model.llm, mc["lora"])
            model.vision_encoder.set_num_frames(mc["vision"]["num_frames"])
            check_fits(model.state_dict(), ck["model"], init_from, "the stage-3 model", strict=True)
            model.load_state_dict(ck["model"])
            log(f"loaded the whole stage-3 model from {init_from}")
        elif kind == "VideoChat2 / InternVideo2-Chat file":
            report = load_videochat2(model, ck, log=log)
            check(report["vision"] == "loaded" or vision_from, f"--init_from={init_from} has no InternVideo2 video "
                  f"encoder ({report['vision']}): give one with --vision_from=<stage-2 checkpoint>")
        else:
            load_video_encoder(model, ck, init_from, log=log)
        loaded[init_from] = kind
    if vision_from:
        ck = load_checkpoint(vision_from)
        loaded[vision_from] = check_init_from(ck, vision_from, ("stage-2 checkpoint", "stage-3 checkpoint",
                                                                "released stage-2 file"), 3, option="--vision_from")
        load_video_encoder(model, ck, vision_from, log=log)
    return loaded


def vision_config_from_state(state, prefix=""):
    """(preset name, VisionConfig) of a released video encoder from its tensors' shapes (keys under `prefix`):
    width and depth pick the preset (1B, 6B, ...; toy for tests), the patch embedding's kernel the patch size, the
    position table the frame count, the attention pool's projection the pooled width."""
    depth_of = lambda pattern: 1 + max(int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m)
    w = state[f"{prefix}patch_embed.proj.weight"]                                # (D, 3, tubelet, p, p)
    dim, patch, depth = w.shape[0], w.shape[-1], depth_of(re.escape(prefix) + r"blocks\.(\d+)\.")
    names = [n for n, c in VISION_PRESETS.items() if (c.dim, c.depth) == (dim, depth)]
    if not names:
        raise CheckpointError(f"no vision preset has width {dim} and depth {depth} (presets: "
                              + ", ".join(f"{n} {c.dim}x{c.depth}" for n, c in VISION_PRESETS.items()) + ")")
    base = VISION_PRESETS[names[0]]
    grid = (base.img_size // patch) ** 2
    n_pos = state[f"{prefix}pos_embed"].shape[1] - 1
    if n_pos % grid:
        raise CheckpointError(f"{prefix}pos_embed has {n_pos} patch rows, not a multiple of {grid} "
                              f"({base.img_size} px in {patch} px patches)")
    return names[0], vision_preset(names[0], num_frames=n_pos // grid * w.shape[2], patch_size=patch,
                                   pool_dim=state[f"{prefix}clip_projector.cross_attn.proj.weight"].shape[0])


def load_official_stage2(raw, log=print):
    """A released InternVideo2 stage-2 checkpoint (`InternVideo2_Stage2_visual`: MM/models/internvideo2_stage2_visual.py:
    17-48), flat or wrapped in `module` / `model`, -> (Stage2Model, {"loaded", "skipped"}). The architecture comes
    from the file's shapes: vision width and depth pick the preset (1B, 6B, ...; toy for tests), the position table
    gives the frame count; BERT's width, depth and first cross-attention layer pick the text preset (bert-large:
    19 text + 5 fusion layers). Keys it does not use (the stage-2 distillation heads `clip_decoder`,
    `final_clip_decoder`, `clip_pos_embed`, the image tables `img_pos_embed`, `clip_img_pos_embed`, BERT's
    `position_ids` and the MLM decoder tied to the word embeddings) are logged by name; a missing or mis-shaped
    required tensor raises KeyError naming it. The audio-visual 6B layout (MM/models/internvideo2_stage2_audiovisual.py)
    adds BEATs under `audio_encoder.` (load_beats; its preset from width and depth) and the audio / fusion
    projections (`audio_proj`, `av_concat_*_proj`, `av_fusion`, `avtm_head`), all required then."""
    state = released_state(raw)
    if not isinstance(state, dict) or "vision_encoder.patch_embed.proj.weight" not in state:
        raise CheckpointError("not an InternVideo2 stage-2 checkpoint: no vision_encoder.patch_embed.proj.weight")
    depth_of = lambda pattern: 1 + max(int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m)

    vname, vcfg = vision_config_from_state(state, "vision_encoder.")

    # text: BERT under text_encoder.bert. (pre-training) or text_encoder. (renamed for evaluation)
    tp = "text_encoder.bert." if "text_encoder.bert.embeddings.word_embeddings.weight" in state else "text_encoder."
    if f"{tp}embeddings.word_embeddings.weight" not in state:
        raise CheckpointError("no text_encoder.bert.embeddings.word_embeddings.weight: not a video-text stage-2 checkpoint")
    vocab, tdim = state[f"{tp}embeddings.word_embeddings.weight"].shape
    layer = re.escape(tp) + r"encoder\.layer\.(\d+)\."
    tdepth = depth_of(layer)
    fusion = min(int(re.match(layer, k).group(1)) for k in state if re.match(layer + "crossattention", k))
    tnames = [n for n, c in TEXT_PRESETS.items() if (c.dim, c.depth, c.fusion_layer) == (tdim, tdepth, fusion)]
    if not tnames:
        raise CheckpointError(f"no text preset has width {tdim}, {tdepth} layers and cross-attention from layer {fusion}")
    tcfg = text_preset(tnames[0], vocab_size=vocab)

    # audio (the 6B audio-visual file): BEATs under audio_encoder., its preset from width and depth
    audio, av_dim = None, 768
    if any(k.startswith("audio_encoder.") for k in state):
        adim = state["audio_encoder.post_extract_proj.weight"].shape[0]
        adepth = depth_of(r"audio_encoder\.encoder\.layers\.(\d+)\.")
        anames = [n for n, c in AUDIO_PRESETS.items() if (c.dim, c.depth) == (adim, adepth)]
        if not anames:
            raise CheckpointError(f"no audio preset has width {adim} and depth {adepth}")
        audio = load_beats(state, prefix="audio_encoder.", base=anames[0])
        av_dim = state["av_concat_vision_proj.0.weight"].shape[0]
    model = Stage2Model(vcfg, tcfg, audio.cfg if audio else None, state["vision_proj.weight"].shape[0], av_dim)
    if audio:
        model.audio_encoder = audio

    # load: the encoder through the stage hand-off, BERT through its key map, then the heads
    report = load_video_encoder(model, {"model": state}, "the stage-2 file", log=lambda m: None)
    used = {f"vision_encoder.{k}" for k in report["loaded"]}
    fresh = load_bert(model.text_encoder, state, prefix="text_encoder.", used=used)
    if fresh:
        raise CheckpointError(f"the stage-2 file lacks BERT tensors: {key_names(fresh)}")
    if audio:       # every audio_encoder.* key is read (layers > 0 repeat layer 0's shared position bias)
        used |= {k for k in state if k.startswith("audio_encoder.")}
    towers = ("vision_encoder.", "text_encoder.", "audio_encoder.")
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith(towers)}
    check_fits(heads, state, "the stage-2 file", "the heads")
    model.load_state_dict({k: state[k] for k in heads}, strict=False)
    used |= set(heads)
    skipped = sorted(k for k in state if k not in used)
    log(f"official stage-2 checkpoint: vision {vname} at {vcfg.num_frames} frames, text {tnames[0]}"
        f"{f', audio {anames[0]}' if audio else ''} "
        f"(vocabulary {vocab}); loaded {len(used)} tensors, none left fresh; ignored {len(skipped)}: {key_names(skipped)}")
    return model, {"loaded": sorted(used), "skipped": skipped}


# ------------------------------------------------------------------------------------------------
# this repository's stage-3 checkpoints: the model, and the tokenizers they carry (chat.py, evaluate.diagnose)

def stage3_model(ck, device, name="--ckpt"):
    """A stage-3 checkpoint dict -> the model in eval mode with LoRA merged."""
    model = Stage3Model.from_config(ck["model_config"])
    # strict: a key too many or too few means another version of the code wrote it
    check_fits(model.state_dict(), ck["model"], name, "the model its model_config builds", strict=True)
    model.load_state_dict(ck["model"])
    merge_lora(model.llm)
    return model.to(device).eval()


def _find(recorded, ckpt_path):
    """A path recorded by the training run, relative to the folder it ran in: as written, else relative to
    the checkpoint's folder or a folder above it (out/stage3/ckpt.pt -> the repository root). None if absent."""
    p = Path(recorded)
    here = Path(ckpt_path).resolve().parent
    bases = [Path()] if p.is_absolute() else [Path(), here, *here.parents]
    return next((b / p for b in bases if (b / p).exists()), None)


def _from_saved(make, name, content):
    """Build a tokenizer whose constructor reads a file from the text or bytes saved in the checkpoint
    (the constructors read the whole file, so the temporary copy can go right after)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text("".join(t + "\n" for t in content), encoding="utf-8")   # itos <-> lines, exactly
        return make(path)


def stage3_tokenizers(ck, ckpt_path, vocab="", llm_tokenizer=""):
    """(BERT WordPiece tokenizer, LLM tokenizer) of a stage-3 checkpoint: the --vocab / --llm_tokenizer
    overrides, else the ones saved in it (ck["tokenizers"]: token lists, or the SentencePiece model's
    bytes), else, for checkpoints older than that, the files its config names, found by _find."""
    saved, cfg = ck.get("tokenizers") or {}, ck.get("config") or {}
    data = cfg.get("data", "")
    if vocab:
        bert = WordPieceTokenizer(vocab)
    elif saved.get("vocab"):
        bert = _from_saved(WordPieceTokenizer, "vocab.txt", saved["vocab"])
    else:
        recorded = cfg.get("vocab") or str(Path(data) / "vocab.txt")
        found = _find(recorded, ckpt_path)
        check(found, f"--ckpt={ckpt_path} holds no BERT vocabulary and its training file {recorded} is not found "
                     f"here or beside the checkpoint: pass --vocab=<the vocab.txt it was trained with>")
        bert = WordPieceTokenizer(found)
    if llm_tokenizer:
        llm = load_llm_tokenizer(llm_tokenizer)
    elif saved.get("llm_vocab"):
        llm = _from_saved(lambda p: load_llm_tokenizer(f"toy:{p}"), "vocab.txt", saved["llm_vocab"])
    elif saved.get("llm_model"):
        llm = _from_saved(lambda p: load_llm_tokenizer(f"sentencepiece:{p}"), "tokenizer.model", saved["llm_model"])
    else:
        spec = cfg.get("llm_tokenizer") or f"toy:{Path(data) / 'vocab.txt'}"
        kind, _, arg = spec.partition(":")
        if kind in ("toy", "sentencepiece"):                 # a file (tiktoken names an encoding)
            found = _find(arg, ckpt_path)
            check(found, f"--ckpt={ckpt_path} holds no LLM tokenizer and its training file {arg} is not found here "
                         f"or beside the checkpoint: pass --llm_tokenizer={kind}:<the file it was trained with>")
            spec = f"{kind}:{found}"
        llm = load_llm_tokenizer(spec)
    mc = ck["model_config"]
    check(len(bert) <= mc["qformer"]["vocab_size"], f"the BERT vocabulary has {len(bert)} tokens, the checkpoint's "
          f"Q-Former {mc['qformer']['vocab_size']}: --vocab is not the one it was trained with")
    check(len(llm) <= mc["llm"]["vocab_size"], f"the LLM tokenizer has {len(llm)} tokens, the checkpoint's LLM "
          f"{mc['llm']['vocab_size']}: --llm_tokenizer is not the one it was trained with")
    return bert, llm
