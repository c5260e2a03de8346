"""Stage 3 of InternVideo2 (VideoChat2-style): connect the video encoder to an LLM through a Q-Former and train
by next-token prediction on video-centric instructions (VC2/models/videochat_mistra/videochat2_it_mistral.py:231-319).

Three sub-stages, run in order by default (each from the previous one's weights):
  1  Q-Former alignment: contrastive + matching + captioning between the Q-Former's queries and the
     caption, video encoder frozen, no LLM (BLIP-2's first stage)
  2  vision-language connection: caption next-token prediction through the LLM, LLM frozen, video
     encoder + Q-Former + projection trained
  3  instruction tuning: QA and captioning conversations, LoRA on the LLM, video encoder + Q-Former
     + projection trained
The loss of sub-stages 2-3 is on answer tokens only; the visual embeddings are spliced in after the
<Video> tag of the VideoChat2 instruction format, after a real BOS embedding.

    python train_stage3.py --init_from=out/stage2/ckpt.pt      # toy on ToyWorld, CPU, about 4 min
    python train_stage3.py --substage=3 --init_from=out/stage3/substage2/ckpt.pt
    python chat.py --ckpt=out/stage3/ckpt.pt --video=data/toyworld/videos/val_00003.webp \\
        --question="what color is the object?"

Writes <out_dir>/substage<k>/{ckpt.pt,log.txt} and <out_dir>/{ckpt.pt,metrics.json} (held-out QA
accuracy per question type and caption accuracy). The toy LLM is pre-trained on ToyWorld's text
first (pretrain_toys.py) as a stand-in for Mistral-7B.
"""
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from checkpoints import TOYS, init_stage3, load_llm, qformer_from_bert
from common import (RunLog, WithLoss, barrier, build_optimizer, by_preset, check, cleanup, cli, compile_blocks,
                    cosine_lr, distribute, finish, load_checkpoint, model_state, optimizer_state, parse_config,
                    preset_img_size, print0, resume, run_summary, save_checkpoint, setup_runtime, store_frozen,
                    training_loop)
from data import (FRAME_CACHE, TOYWORLD, VideoTextDataset, WordPieceTokenizer, load_llm_tokenizer, prepare_toyworld,
                  sample_file, stage3_fields, train_loader, video_index)
from fsdp import shard
from losses import stage3_objective
from model import (LLM_PRESETS, QFORMER_PRESETS, VISION_PRESETS, Stage3Model, add_lora, param_table, text_preset,
                   vision_preset)
from plots import loss_figure, save_pictures
from pretrain_toys import pretrain_toy_bert, pretrain_toy_llm
from runs import claim_run_dir


@dataclass
class Stage3Config:
    # data
    data: str = TOYWORLD            # folder with train.jsonl and val.jsonl (ToyWorld is generated if missing), or the
                                    # official annotation files train.json and val.json (data.load_official_json)
    data_root: str = ""             # where the media paths start (the official data_root); "" = the sample file's folder
    vocab: str = ""                 # BERT vocab.txt for the Q-Former's text; "" = <data>/vocab.txt
    llm_tokenizer: str = ""         # toy:<vocab.txt> | sentencepiece:<tokenizer.model> | tiktoken:<name>; "" = toy
    max_text_len: int = 24          # Q-Former text tokens (instruction, caption)
    max_llm_len: int = 0            # LLM sequence length; 0 = by preset
    skip_bad_samples: bool = False  # replace unreadable samples by the next one, count and report them
    frame_cache: str = "auto"       # decoded frames kept in memory, shrunk to what training needs: auto (datasets up
                                    # to 5000 clips) | on | off
    frame_cache_mb: int = 2048      # the cache's budget per process (x workers x ranks); later clips are decoded again
    workers: int = 0                # DataLoader worker processes
    crop_scale: float = 0.8         # smallest random-resized-crop area
    # model
    preset: str = "toy"             # vision: toy | S | B | L | 1B | 6B
    qformer: str = "toy"            # toy | base (96 queries, cross-attention every 2nd layer)
    llm: str = "toy"                # toy | mistral-7b
    num_frames: tuple = ()          # frames per clip in sub-stages 1, 2, 3; () = by preset
    img_size: int = 0               # 0 = the preset's
    init_from: str = ""             # a run's start: a stage-2 checkpoint (video encoder, pos-embed 4 -> 8 frames), a
                                    # stage-3 one, or a released VideoChat2 / InternVideo2-Chat file (init_stage3)
    vision_from: str = ""           # the video encoder from this stage-2/3 file instead (e.g. beside a VideoChat2 file)
    qformer_bert: str = ""          # BERT state dict (HF names) for the Q-Former; toy: "" = toys/toy_bert.pt
    llm_ckpt: str = ""              # LLM state dict (HF names); toy: "" = toys/toy_llm.pt (both shipped)
    qformer_text_input: bool = True # instruction -> Q-Former (VC2/scripts/videochat_mistral/config_7b_stage3.py:69)
    lora_r: int = 16                # LoRA r, alpha, dropout (VC2/scripts/videochat_mistral/config_7b_stage3.py:79-82)
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # schedule: lr 1e-4, 1e-4, 2e-5; wd 0.02; betas 0.9, 0.999 (VC2/scripts/videochat_mistral/config_7b_stage3.py:86-96)
    substage: int = 0               # 1 | 2 | 3; 0 = all three in order
    max_steps: tuple = (80, 120, 220)  # optimizer steps of sub-stages 1, 2, 3 (set them for your data)
    warmup_steps: tuple = ()        # linear warmup of each sub-stage; () = a tenth of its max_steps
    lr: tuple = ()                  # peak lr of each sub-stage; () = by preset
    min_lr_ratio: float = 0.1       # cosine floor as a fraction of the peak (official 0.25 in sub-stage 3)
    weight_decay: float = 0.02      # not on 1-D params, biases, sub-stage 1's queries (Stage3Model.no_weight_decay)
    batch_size: int = 32            # clips per process and step
    grad_accum: int = 1             # micro-batches per step (no contrastive negatives are lost in sub-stages 2-3)
    grad_clip: float = 1.0          # max global grad norm
    # system
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"             # auto (CUDA bf16, else fp32) | float32 | bfloat16 | float16
    compile: bool = False           # torch.compile every block of every tower (regional)
    grad_ckpt_blocks: int = 0       # activation checkpointing for the first N vision blocks
    fsdp: bool = False              # under torchrun: FSDP2-shard the model (7B LLM) instead of DDP; one --substage
    seed: int = 0
    out_dir: str = "out/stage3"     # substage<k>/ckpt.pt + log.txt, ckpt.pt, metrics.json
    resume: bool = False            # skip finished sub-stages and continue the current one exactly
    overwrite: bool = False         # start anew in an --out_dir that holds another run (its files are replaced)
    ckpt_every: int = 200           # steps between checkpoints (and at the end of each sub-stage)
    stop_after: int = 0             # stop the current sub-stage after this step (0 = off)
    log_every: int = 10             # steps between log.txt lines
    max_nan_in_a_row: int = 5       # non-finite losses in a row that stop the run
    eval: bool = True               # held-out QA and captioning at the end
    eval_batch: int = 64            # clips per evaluation batch

    # Defaults by preset, (toy, full). Full: the official one (VC2/scripts/videochat_mistral/config_7b_stage3.py:13-96);
    # toy: 8 frames throughout, as its stage 2 (ToyWorld's speeds), and the toy networks train at a higher lr.
    BY_PRESET = {"lr": ((1e-3, 1e-3, 1e-3), (1e-4, 1e-4, 2e-5)), "num_frames": ((8, 8, 8), (4, 4, 8)),
                 "max_llm_len": (48, 512)}
    # the names stages 1 and 2 use for the same ideas, here with a value per sub-stage (common.parse_config)
    ALIASES = {"steps": "max_steps", "frames": "num_frames", "lrs": "lr"}

    def validate(self):
        check(self.substage in (0, 1, 2, 3), f"--substage must be 0 (all), 1, 2 or 3, got {self.substage}")
        check(self.preset in VISION_PRESETS, f"--preset must be one of {list(VISION_PRESETS)}, got {self.preset!r}")
        check(self.qformer in QFORMER_PRESETS, f"--qformer must be one of {list(QFORMER_PRESETS)}")
        check(self.llm in LLM_PRESETS, f"--llm must be one of {list(LLM_PRESETS)}")
        check(len(self.max_steps) == 3 and all(s >= 0 for s in self.max_steps),
              "--max_steps wants three step counts, one per sub-stage")
        check(self.batch_size > 0 and self.grad_accum > 0, "--batch_size and --grad_accum must be positive")
        check(not self.fsdp or self.substage, "--fsdp runs one sub-stage per invocation (--substage=1, 2 or 3): "
              "LoRA and the frame count change the parameters between sub-stages")
        by_preset(self, self.BY_PRESET, 0 if self.preset == "toy" else 1)
        self.img_size = preset_img_size(self.preset, VISION_PRESETS[self.preset], self.img_size)
        self.warmup_steps = self.warmup_steps or tuple(int(0.1 * n) for n in self.max_steps)
        check(len(self.warmup_steps) == 3 and all(w >= 0 for w in self.warmup_steps),
              "--warmup_steps wants three step counts, one per sub-stage")
        check(len(self.lr) == 3, "--lr wants three learning rates, one per sub-stage")
        check(len(self.num_frames) == 3 and all(f > 0 for f in self.num_frames),
              "--num_frames wants three frame counts, one per sub-stage")


def load_pretrained(model, cfg, bert_tok, llm_tok, rt):
    """The Q-Former from a BERT and the LLM from its checkpoint, as VideoChat2 starts (bert-base-uncased,
    Mistral-7B); the toy presets take the stand-ins shipped in toys/, trained on ToyWorld's text when missing."""
    qbert, llm_ckpt = cfg.qformer_bert, cfg.llm_ckpt
    if cfg.qformer == "toy":
        qbert = qbert or str(TOYS / "toy_bert.pt")
        if rt.master and not Path(qbert).exists():
            pretrain_toy_bert(cfg.data, bert_tok, text_preset("toy", vocab_size=len(bert_tok)), qbert,
                              max_len=cfg.max_text_len, seed=cfg.seed)
    if cfg.llm == "toy":
        llm_ckpt = llm_ckpt or str(TOYS / "toy_llm.pt")
        if rt.master and not Path(llm_ckpt).exists():
            q = model.qformer.cfg
            pretrain_toy_llm(cfg.data, llm_tok, model.llm.cfg, llm_ckpt, n_visual=q.num_query + q.extra_query,
                             max_len=cfg.max_llm_len, seed=cfg.seed)
    barrier(rt)
    if qbert:
        qformer_from_bert(model.qformer, load_checkpoint(qbert), log=lambda msg: print0(f"{qbert}: {msg}", rt=rt))
    if llm_ckpt:
        load_llm(model.llm, load_checkpoint(llm_ckpt), log=lambda msg: print0(f"{llm_ckpt}: {msg}", rt=rt))


def stage3_checkpoint(model, cfg, bert_tok, llm_tok, **state):
    """A stage-3 checkpoint: `state` (step; a sub-stage's adds its optimizer and scaler), the weights, the run's
    config, what rebuilds the model (model_config, LoRA settings included), and the vocabularies, so that chat.py
    needs no data folder."""
    return {"stage": 3, **state, "model": model_state(model), "config": asdict(cfg),
            "model_config": model.model_config(),
            "tokenizers": {"vocab": bert_tok.itos, "llm_vocab": llm_tok.wp.itos if hasattr(llm_tok, "wp") else None,
                           "llm_model": llm_tok.sp.serialized_model_proto() if hasattr(llm_tok, "sp") else None}}


def main(argv=None):
    cfg = parse_config(Stage3Config(), sys.argv[1:] if argv is None else argv, __doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    claim_run_dir(cfg.out_dir, rt, cfg.resume, cfg.overwrite)
    out_dir = Path(cfg.out_dir)
    subs = [cfg.substage] if cfg.substage else [1, 2, 3]

    # ---- data: the tokenizers (each sub-stage reads the clips with its own frames and text, below) -------------
    prepare_toyworld(cfg.data, rt)
    bert_tok = WordPieceTokenizer(cfg.vocab or Path(cfg.data) / "vocab.txt")
    llm_tok = load_llm_tokenizer(cfg.llm_tokenizer or f"toy:{Path(cfg.data) / 'vocab.txt'}")
    video_at = video_index(llm_tok)

    # ---- model: the networks, their pre-trained parts, then --init_from / --vision_from ------------------------
    vcfg = vision_preset(cfg.preset, num_frames=cfg.num_frames[subs[0] - 1], img_size=cfg.img_size)
    qcfg = replace(QFORMER_PRESETS[cfg.qformer], **({"vocab_size": len(bert_tok)} if cfg.qformer == "toy" else {}))
    lcfg = replace(LLM_PRESETS[cfg.llm], **({"vocab_size": len(llm_tok)} if cfg.llm == "toy" else {}))
    check(len(llm_tok) <= lcfg.vocab_size, f"the LLM tokenizer has {len(llm_tok)} tokens, the LLM {lcfg.vocab_size}")
    model = Stage3Model(vcfg, qcfg, lcfg)
    load_pretrained(model, cfg, bert_tok, llm_tok, rt)
    init_stage3(model, cfg.init_from, cfg.vision_from, log=lambda msg: print0(msg, rt=rt))
    model.to(rt.device)
    if not cfg.fsdp:        # FSDP2 shards the fp32 weights instead (and wants one dtype per block)
        store_frozen(model.llm.requires_grad_(False), rt.frozen_dtype)
    model.vision_encoder.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    if cfg.compile:
        compile_blocks(model)

    results, log = {}, None
    for sub in subs:
        # ---- sub-stage <sub>: its frames, trainable parts, optimizer, resume -----------------------------------
        sub_dir, total, lr = out_dir / f"substage{sub}", cfg.max_steps[sub - 1], cfg.lr[sub - 1]
        torch.manual_seed(cfg.seed + 1000 * sub + rt.rank)   # its own stream: alone (--substage) = after the others
        model.vision_encoder.set_num_frames(cfg.num_frames[sub - 1])    # 4 -> 8 frames before sub-stage 3
        model.to(rt.device)
        if sub == 3 and not any("lora_" in k for k in model.state_dict()):
            add_lora(model.llm, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
            model.to(rt.device)
        model.set_trainable(sub)
        wrapped = WithLoss(model, lambda model, batch, sub=sub: stage3_objective(
            model, batch, substage=sub, video_at=video_at, qformer_text_input=cfg.qformer_text_input))
        if cfg.fsdp:
            shard(wrapped, rt)                               # after LoRA and the frame change, before the optimizer
        optimizer = build_optimizer(model, lr, cfg.weight_decay, (0.9, 0.999), 1e-8, model.no_weight_decay(sub),
                                    rt.device.type)
        scaler = rt.make_scaler()
        step, ck = resume(sub_dir, model, optimizer, scaler, rt, cfg, stage=3) if cfg.resume else (0, None)
        if step >= total:
            print0(f"sub-stage {sub} already finished ({sub_dir / 'ckpt.pt'})", rt=rt)
            continue
        log = RunLog(sub_dir, cfg, rt, resume=step > 0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"stage 3, sub-stage {sub}: {trainable / 1e6:.2f}M trainable\n{param_table(model)}", rt=rt)

        # ---- its data --------------------------------------------------------------------------------------------
        train_set = VideoTextDataset(sample_file(cfg.data, "train"), cfg.num_frames[sub - 1], vcfg.img_size,
                                     train=True, seed=cfg.seed + sub, skip_bad=cfg.skip_bad_samples,
                                     data_root=cfg.data_root or None, cache=FRAME_CACHE[cfg.frame_cache],
                                     cache_mb=cfg.frame_cache_mb, crop_scale=(cfg.crop_scale, 1.0),
                                     extra=stage3_fields(llm_tok, bert_tok, sub, qcfg.num_query + qcfg.extra_query,
                                                         cfg.max_llm_len, cfg.max_text_len))
        wrapped = distribute(wrapped, rt, find_unused=True)

        # ---- train -----------------------------------------------------------------------------------------------
        def save(step, nan_skips, sub=sub, sub_dir=sub_dir, optimizer=optimizer, scaler=scaler):
            save_checkpoint(sub_dir / "ckpt.pt", stage3_checkpoint(
                model, cfg, bert_tok, llm_tok, substage=sub, step=step, optimizer=optimizer_state(model, optimizer),
                scaler=scaler.state_dict() if scaler else None, nan_skips=nan_skips), rt)

        global_batch = cfg.batch_size * cfg.grad_accum * rt.world
        loader = iter(train_loader(train_set, cfg.batch_size, rt.rank, rt.world, cfg.seed + sub,
                                   start=step * cfg.grad_accum, workers=cfg.workers))
        model.train()
        results[sub] = training_loop(
            wrapped, optimizer, loader, rt, replace(cfg, max_steps=total), step=step, scaler=scaler, log=log,
            save=save, desc=f"stage 3.{sub}", clips_per_step=global_batch, bad_lines=train_set.n_bad_lines,
            nan_skips=ck.get("nan_skips", 0) if ck else 0,
            lr_at=lambda s: cosine_lr(s, total, cfg.warmup_steps[sub - 1], lr, cfg.min_lr_ratio * lr))
        if results[sub]["step"] < total:                     # --stop_after: stop here, resume later
            cleanup(rt)
            return {"stage": 3, "substage": sub, "steps": results[sub]["step"], "finished": False}

    # ---- the chat model, its curves, evaluate ------------------------------------------------------------------
    save_checkpoint(out_dir / "ckpt.pt", stage3_checkpoint(model, cfg, bert_tok, llm_tok, step=sum(cfg.max_steps)), rt)
    save_pictures(out_dir, lambda: {"loss.png": loss_figure({f"sub-stage {s}": r for s, r in results.items()})}, rt)
    metrics = {"stage": 3, "preset": cfg.preset}
    for sub, res in results.items():
        metrics.update({f"substage{sub}_{k}": v for k, v in run_summary(res, cfg.max_steps[sub - 1]).items()})
    if cfg.eval and cfg.fsdp and rt.ddp:
        print0(f"--fsdp: no end-of-run evaluation (sharded forwards would need equal batches on every rank); "
               f"evaluate on one process: python train_stage3.py --substage=3 --max_steps=0,0,0 "
               f"--init_from={out_dir / 'ckpt.pt'} --out_dir={out_dir}_eval", rt=rt)
    elif cfg.eval:
        from evaluate import evaluate_stage3
        metrics.update(evaluate_stage3(model, llm_tok, bert_tok, cfg, model.vision_encoder.cfg, rt, video_at))
    return finish(out_dir, metrics, rt, lambda k: k.startswith(("qa_acc", "qa_chance", "caption_")), log)


if __name__ == "__main__":
    cli(main)
