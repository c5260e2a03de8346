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
from types import SimpleNamespace

import torch

from checkpoints import TOYS, check_init_from, load_llm, load_video_encoder, load_videochat2, qformer_from_bert
from common import (RunLog, WithLoss, barrier, build_optimizer, by_preset, check, claim_run_dir, cleanup, cli,
                    compile_blocks, cosine_lr, distribute, finish, load_checkpoint, model_state,
                    optimizer_state, parse_config, print0, resume, run_summary, save_checkpoint, setup_runtime, shard,
                    store_frozen, training_loop)
from data import (FRAME_CACHE, TOYWORLD, VideoTextDataset, WordPieceTokenizer, load_llm_tokenizer, prepare_toyworld,
                  sample_file, stage3_fields, train_loader, video_index)
from losses import stage3_objective
from model import (LLM_PRESETS, QFORMER_PRESETS, VISION_PRESETS, Stage3Model, add_lora, lora_config, param_table,
                   restore_lora, text_preset, vision_preset)
from plots import loss_figure, save_pictures
from pretrain_toys import pretrain_toy_bert, pretrain_toy_llm


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
    frames: tuple = ()              # frames per clip in sub-stages 1-3; () = by preset
    img_size: int = 0               # 0 = the preset's
    init_from: str = ""             # stage-2 checkpoint (video encoder, pos-embed 4 -> 8 frames), a stage-3 one, or a
                                    # released VideoChat2 / InternVideo2-Chat file (Q-Former, queries, projection, LoRA)
    vision_from: str = ""           # the video encoder from this stage-2/3 file instead (e.g. beside a VideoChat2 file)
    qformer_bert: str = ""          # BERT state dict (HF names) for the Q-Former; toy: "" = toys/toy_bert.pt
    llm_ckpt: str = ""              # LLM state dict (HF names); toy: "" = toys/toy_llm.pt (both shipped)
    qformer_text_input: bool = True # instruction -> Q-Former (VC2/scripts/videochat_mistral/config_7b_stage3.py:69)
    lora_r: int = 16                # LoRA r, alpha, dropout (VC2/scripts/videochat_mistral/config_7b_stage3.py:79-82)
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    # schedule: lr 1e-4, 1e-4, 2e-5; wd 0.02; betas 0.9, 0.999 (VC2/scripts/videochat_mistral/config_7b_stage3.py:86-96)
    substage: int = 0               # 1 | 2 | 3; 0 = all three in order
    steps: tuple = (80, 120, 220)   # optimizer steps of sub-stages 1, 2, 3 (set them for your data)
    lrs: tuple = ()                 # peak lr of each sub-stage; () = by preset
    warmup_frac: float = 0.1        # warmup steps as a fraction of each sub-stage
    min_lr_ratio: float = 0.1       # cosine floor as a fraction of the peak (official 0.25 in sub-stage 3)
    weight_decay: float = 0.02
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
    BY_PRESET = {"lrs": ((1e-3, 1e-3, 1e-3), (1e-4, 1e-4, 2e-5)), "frames": ((8, 8, 8), (4, 4, 8)),
                 "max_llm_len": (48, 512)}

    def validate(self):
        check(self.substage in (0, 1, 2, 3), f"--substage must be 0 (all), 1, 2 or 3, got {self.substage}")
        check(self.preset in VISION_PRESETS, f"--preset must be one of {list(VISION_PRESETS)}, got {self.preset!r}")
        check(self.qformer in QFORMER_PRESETS, f"--qformer must be one of {list(QFORMER_PRESETS)}")
        check(self.llm in LLM_PRESETS, f"--llm must be one of {list(LLM_PRESETS)}")
        check(len(self.steps) == 3 and all(s >= 0 for s in self.steps), "--steps wants three step counts")
        check(self.batch_size > 0 and self.grad_accum > 0, "--batch_size and --grad_accum must be positive")
        check(not self.fsdp or self.substage, "--fsdp runs one sub-stage per invocation (--substage=1, 2 or 3): "
              "LoRA and the frame count change the parameters between sub-stages")
        by_preset(self, self.BY_PRESET, 0 if self.preset == "toy" else 1)
        self.img_size = self.img_size or VISION_PRESETS[self.preset].img_size
        check(self.img_size % VISION_PRESETS[self.preset].patch_size == 0, f"--img_size must be a multiple of the {self.preset} preset's "
              f"{VISION_PRESETS[self.preset].patch_size} px patches, got {self.img_size}")
        check(len(self.lrs) == 3, "--lrs wants three learning rates")
        check(len(self.frames) == 3 and all(f > 0 for f in self.frames), "--frames wants three frame counts")


def main(argv=None):
    cfg = parse_config(Stage3Config(), sys.argv[1:] if argv is None else argv, __doc__)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    claim_run_dir(cfg.out_dir, rt, cfg.resume, cfg.overwrite)
    out_dir = Path(cfg.out_dir)
    prepare_toyworld(cfg.data, rt)

    # ---- tokenizers, model, pre-trained parts -------------------------------------------------
    bert_tok = WordPieceTokenizer(cfg.vocab or Path(cfg.data) / "vocab.txt")
    llm_tok = load_llm_tokenizer(cfg.llm_tokenizer or f"toy:{Path(cfg.data) / 'vocab.txt'}")
    subs = [cfg.substage] if cfg.substage else [1, 2, 3]
    vcfg = vision_preset(cfg.preset, num_frames=cfg.frames[subs[0] - 1], img_size=cfg.img_size)
    qcfg = replace(QFORMER_PRESETS[cfg.qformer], **({"vocab_size": len(bert_tok)} if cfg.qformer == "toy" else {}))
    lcfg = replace(LLM_PRESETS[cfg.llm], **({"vocab_size": len(llm_tok)} if cfg.llm == "toy" else {}))
    check(len(llm_tok) <= lcfg.vocab_size, f"the LLM tokenizer has {len(llm_tok)} tokens, the LLM {lcfg.vocab_size}")
    model = Stage3Model(vcfg, qcfg, lcfg)
    qbert, llm_ckpt = cfg.qformer_bert, cfg.llm_ckpt
    if cfg.qformer == "toy":                                # the toy stand-ins for bert-base and Mistral-7B
        qbert = qbert or str(TOYS / "toy_bert.pt")
        if rt.master and not Path(qbert).exists():
            pretrain_toy_bert(cfg.data, bert_tok, text_preset("toy", vocab_size=len(bert_tok)), qbert,
                              max_len=cfg.max_text_len, seed=cfg.seed)
    if cfg.llm == "toy":
        llm_ckpt = llm_ckpt or str(TOYS / "toy_llm.pt")
        if rt.master and not Path(llm_ckpt).exists():
            pretrain_toy_llm(cfg.data, llm_tok, lcfg, llm_ckpt, n_visual=qcfg.num_query + qcfg.extra_query,
                             max_len=cfg.max_llm_len, seed=cfg.seed)
    barrier(rt)
    if qbert:
        qformer_from_bert(model.qformer, load_checkpoint(qbert), log=lambda msg: print0(f"{qbert}: {msg}", rt=rt))
    if llm_ckpt:
        load_llm(model.llm, load_checkpoint(llm_ckpt), log=lambda msg: print0(f"{llm_ckpt}: {msg}", rt=rt))
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from)
        kind = check_init_from(ck, cfg.init_from, ("stage-2 checkpoint", "stage-3 checkpoint", "released stage-2 file",
                                                   "VideoChat2 / InternVideo2-Chat file"), stage=3)
        if kind.startswith("VideoChat2"):          # Q-Former, queries, projection, LoRA (+ an InternVideo2 encoder)
            report = load_videochat2(model, ck, log=lambda msg: print0(msg, rt=rt))
            check(report["vision"] == "loaded" or cfg.vision_from, f"{cfg.init_from} has no InternVideo2 video "
                  f"encoder ({report['vision']}): give one with --vision_from=<stage-2 checkpoint>")
        elif ck.get("stage") == 3:                   # everything, at its own frame count (e.g. sub-stage 2's
            if ck.get("lora"):                     # 4 before 3's 8); the sub-stage loop then resizes the
                restore_lora(model.llm, ck["lora"])  # table as a run that did both sub-stages in one go
            model.vision_encoder.set_num_frames(ck["model_config"]["vision"]["num_frames"])
            model.load_state_dict(ck["model"])
            print0(f"loaded the whole stage-3 model from {cfg.init_from}", rt=rt)
        else:                                      # the hand-off: its video encoder
            load_video_encoder(model, ck, cfg.init_from, log=lambda msg: print0(msg, rt=rt))
    if cfg.vision_from:                            # the video encoder from another file (after --init_from)
        ck = load_checkpoint(cfg.vision_from)
        check_init_from(ck, cfg.vision_from, ("stage-2 checkpoint", "stage-3 checkpoint", "released stage-2 file"), 3)
        load_video_encoder(model, ck, cfg.vision_from, log=lambda msg: print0(msg, rt=rt))
    model.to(rt.device)
    if not cfg.fsdp:        # FSDP2 shards the fp32 weights instead (and wants one dtype per block)
        store_frozen(model.llm.requires_grad_(False), rt.frozen_dtype)
    model.vision_encoder.grad_ckpt_blocks = cfg.grad_ckpt_blocks
    if cfg.compile:
        compile_blocks(model)
    n_visual = qcfg.num_query + qcfg.extra_query
    video_at = video_index(llm_tok)
    lora_kw = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout}

    def model_config():
        return {"vision": asdict(model.vision_encoder.cfg), "qformer": asdict(model.qformer.cfg), "llm": asdict(lcfg),
                "lora": lora_config(model.llm)}

    # ---- the sub-stages -----------------------------------------------------------------------
    results = {}
    for sub in subs:
        sub_dir = out_dir / f"substage{sub}"
        torch.manual_seed(cfg.seed + 1000 * sub + rt.rank)   # its own stream: alone (--substage) = after the others
        model.vision_encoder.set_num_frames(cfg.frames[sub - 1])        # 4 -> 8 frames before sub-stage 3
        model.to(rt.device)
        scfg = SimpleNamespace(**{**asdict(cfg), "max_steps": cfg.steps[sub - 1]})
        if sub == 3 and not any("lora_" in k for k in model.state_dict()):
            add_lora(model.llm, **lora_kw)
            model.to(rt.device)
        model.set_trainable(sub)
        wrapped = WithLoss(model, lambda model, batch, sub=sub: stage3_objective(
            model, batch, substage=sub, video_at=video_at, qformer_text_input=cfg.qformer_text_input))
        if cfg.fsdp:
            shard(wrapped, rt)                               # after LoRA and the frame change, before the optimizer
        optimizer = build_optimizer(model, cfg.lrs[sub - 1], cfg.weight_decay, (0.9, 0.999), 1e-8,
                                    {"temp"}, rt.device.type)
        scaler = rt.make_scaler()
        step, ck = resume(sub_dir, model, optimizer, scaler, rt, cfg, stage=3) if cfg.resume else (0, None)
        if step >= scfg.max_steps:
            print0(f"sub-stage {sub} already finished ({sub_dir / 'ckpt.pt'})", rt=rt)
            continue
        log = RunLog(sub_dir, cfg, rt, resume=step > 0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"stage 3, sub-stage {sub}: {trainable / 1e6:.2f}M trainable\n{param_table(model)}", rt=rt)
        train_set = VideoTextDataset(sample_file(cfg.data, "train"), cfg.frames[sub - 1], vcfg.img_size, train=True,
                                     seed=cfg.seed + sub, skip_bad=cfg.skip_bad_samples, data_root=cfg.data_root or None,
                                     cache=FRAME_CACHE[cfg.frame_cache], cache_mb=cfg.frame_cache_mb,
                                     crop_scale=(cfg.crop_scale, 1.0),
                                     extra=stage3_fields(llm_tok, bert_tok, sub, n_visual, cfg.max_llm_len,
                                                         cfg.max_text_len))
        wrapped = distribute(wrapped, rt, find_unused=True)

        def save(step, nan_skips, sub=sub, sub_dir=sub_dir, optimizer=optimizer, scaler=scaler):
            save_checkpoint(sub_dir / "ckpt.pt", {
                "stage": 3, "substage": sub, "step": step, "model": model_state(model),
                "optimizer": optimizer_state(model, optimizer), "scaler": scaler.state_dict() if scaler else None,
                "config": asdict(cfg), "model_config": model_config(), "lora": model_config()["lora"],
                "nan_skips": nan_skips,
                # the vocabularies travel with the weights: chat.py needs no data folder
                "tokenizers": {"vocab": bert_tok.itos, "llm_vocab": llm_tok.wp.itos if hasattr(llm_tok, "wp") else None,
                               "llm_model": llm_tok.sp.serialized_model_proto() if hasattr(llm_tok, "sp") else None}},
                rt)

        global_batch = cfg.batch_size * cfg.grad_accum * rt.world
        loader = iter(train_loader(train_set, cfg.batch_size, rt.rank, rt.world, cfg.seed + sub,
                                   start=step * cfg.grad_accum, workers=cfg.workers))
        model.train()
        lr, total = cfg.lrs[sub - 1], scfg.max_steps
        results[sub] = training_loop(
            wrapped, optimizer, loader, rt, scfg, step=step, scaler=scaler, log=log, save=save,
            desc=f"stage 3.{sub}", clips_per_step=global_batch, bad_lines=train_set.n_bad_lines,
            nan_skips=ck.get("nan_skips", 0) if ck else 0,
            lr_at=lambda s: cosine_lr(s, total, int(cfg.warmup_frac * total), lr, cfg.min_lr_ratio * lr))
        if results[sub]["step"] < total:                     # --stop_after: stop here, resume later
            cleanup(rt)
            return {"stage": 3, "substage": sub, "steps": results[sub]["step"], "finished": False}

    # ---- final checkpoint and evaluation ------------------------------------------------------
    save_checkpoint(out_dir / "ckpt.pt", {"stage": 3, "step": sum(cfg.steps), "model": model_state(model),
                                          "config": asdict(cfg), "model_config": model_config(),
                                          "lora": model_config()["lora"],
                                          # as in the sub-stages' checkpoints: chat.py needs no data folder
                                          "tokenizers": {
                                              "vocab": bert_tok.itos,
                                              "llm_vocab": llm_tok.wp.itos if hasattr(llm_tok, "wp") else None,
                                              "llm_model": llm_tok.sp.serialized_model_proto()
                                              if hasattr(llm_tok, "sp") else None}}, rt)
    save_pictures(out_dir, lambda: {"loss.png": loss_figure({f"sub-stage {s}": r for s, r in results.items()})}, rt)
    metrics = {"stage": 3, "preset": cfg.preset}
    for sub, res in results.items():
        metrics.update({f"substage{sub}_{k}": v for k, v in run_summary(res, cfg.steps[sub - 1]).items()})
    if cfg.eval and cfg.fsdp and rt.ddp:
        print0(f"--fsdp: no end-of-run evaluation (sharded forwards would need equal batches on every rank); "
               f"evaluate on one process: python train_stage3.py --substage=3 --steps=0,0,0 "
               f"--init_from={out_dir / 'ckpt.pt'} --out_dir={out_dir}_eval", rt=rt)
    elif cfg.eval:
        from evaluate import evaluate_stage3
        metrics.update(evaluate_stage3(model, llm_tok, bert_tok, cfg, model.vision_encoder.cfg, rt, video_at))
    return finish(out_dir, metrics, rt, lambda k: k.startswith(("qa_acc", "qa_chance", "caption_")))


if __name__ == "__main__":
    cli(main)
