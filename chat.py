"""chat.py: ask a trained stage-3 model about a video.

    python chat.py --ckpt=out/stage3/ckpt.pt --video=data/toyworld/videos/val_00003.webp \\
        --question="what color is the object?"
    python chat.py --ckpt=out/stage3/ckpt.pt --video=my_clip.mp4                  # interactive (Ctrl-D ends)
    python chat.py ... --temperature=0.7 --top_p=0.9                               # sampling, not greedy

The video is read and sampled like a held-out clip (middle frame of each segment, resized,
ImageNet-normalised); the answer is decoded with the KV cache, LoRA merged into the LLM. The checkpoint
carries its tokenizers (train_stage3.py saves them), so it needs no data folder; an older checkpoint
finds them where it was trained (paths as recorded, or relative to the checkpoint's folder and the folders
above it), or through --vocab and --llm_tokenizer.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoints import checkpoint_kind, stage3_model, stage3_tokenizers
from common import ConfigError, check, cli, load_checkpoint, parse_config, pick_device
from data import DataError, build_chat, frame_indices, read_frames, video_index, video_transform
from evaluate import answer_questions


@dataclass
class ChatConfig:
    ckpt: str = "out/stage3/ckpt.pt"   # a stage-3 checkpoint (train_stage3.py; a sub-stage's works too)
    video: str = ""                 # required: the clip, a frame folder, GIF, WebP, or mp4 (PyAV)
    question: str = ""              # one question, answered and printed; omit for an interactive chat
    temperature: float = 0.0        # 0 = greedy; > 0 samples
    top_p: float = 1.0              # nucleus sampling: the smallest set of tokens reaching this mass, in (0, 1]
    max_new_tokens: int = 24        # answer length cap, >= 1
    max_llm_len: int = 0            # prompt tokens allowed (chat format, video slots, question); 0 = the checkpoint's
    vocab: str = ""                 # BERT vocab.txt for the Q-Former; "" = the one saved in the checkpoint
    llm_tokenizer: str = ""         # toy:<vocab.txt> | sentencepiece:<file> | tiktoken:<name>; "" = the checkpoint's
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps

    def validate(self):
        check(self.video, "--video is required: a frame folder, GIF, WebP or mp4 to ask about")
        check(Path(self.video).exists(), f"--video={self.video}: no such file or folder")
        check(Path(self.ckpt).is_file(), f"--ckpt={self.ckpt}: no such file (train_stage3.py writes "
                                         f"<out_dir>/ckpt.pt, out/stage3/ckpt.pt by default)")
        check(self.max_new_tokens >= 1, f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check(0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}")
        check(self.max_llm_len >= 0, f"--max_llm_len must be >= 0 (0 = the checkpoint's), got {self.max_llm_len}")


def read_chat_checkpoint(path):
    """A stage-3 checkpoint file -> its dict; ConfigError naming --ckpt and what the file is for anything else
    (CheckpointError from load_checkpoint for a file that is no checkpoint at all)."""
    ck = load_checkpoint(path)
    kind = checkpoint_kind(ck)
    check(kind == "stage-3 checkpoint" and "model_config" in ck,
          f"--ckpt={path} is " + ("no checkpoint of a layout we know" if kind == "unknown" else
                                  f"{'an' if kind == 'LLM' else 'a'} {kind}")
          + "; chat needs a stage-3 checkpoint (train_stage3.py)")
    return ck


def load_chat_model(ckpt_path, device):
    """A stage-3 checkpoint -> (model in eval mode with LoRA merged, its config dict)."""
    ck = read_chat_checkpoint(ckpt_path)
    return stage3_model(ck, device, f"--ckpt={ckpt_path}"), ck["config"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_config(ChatConfig(), argv, __doc__)
    check(a.question.strip() or not any(x.startswith("--question=") for x in argv),
          "--question is empty: ask something, or leave --question out for an interactive chat")
    try:
        device = pick_device(a.device)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {a.device!r}") from None
    check(device.type != "cuda" or torch.cuda.is_available(), f"--device={a.device}: no CUDA device here")
    ck = read_chat_checkpoint(a.ckpt)
    bert_tok, llm_tok = stage3_tokenizers(ck, a.ckpt, a.vocab, a.llm_tokenizer)
    model, cfg = stage3_model(ck, device, f"--ckpt={a.ckpt}"), ck["config"]
    vcfg = model.vision_encoder.cfg
    frames = read_frames(a.video, lambda n: frame_indices(n, vcfg.num_frames, train=False))
    video = video_transform(frames, vcfg.img_size, train=False)[None].to(device)
    video_at = video_index(llm_tok)
    with torch.no_grad():
        tokens = model.video_tokens(video)

    # the prompt must fit the conversation length the model was trained on (or --max_llm_len)
    n_visual = model.qformer.cfg.num_query + model.qformer.cfg.extra_query
    limit = a.max_llm_len or cfg["max_llm_len"]
    source = "--max_llm_len" if a.max_llm_len else "the checkpoint's max_llm_len"
    fixed = int(build_chat(llm_tok, [("", None)], n_visual, n_visual + 256)[2].sum())   # format + slots, unpadded

    def too_long(question):
        """None when the prompt fits, else the one-line reason."""
        try:
            build_chat(llm_tok, [(question, None)], n_visual, limit)
            return None
        except DataError:
            n = len(llm_tok.encode(question))
            return (f"the question is {n} tokens, room is left for {max(limit - fixed, 0)}: prompts hold {limit} "
                    f"tokens ({source}), {fixed} of them the chat format with {n_visual} video slots; ask a shorter "
                    f"question, or pass --max_llm_len={fixed + n} (longer than the model was trained on)")

    def ask(question):
        return answer_questions(model, tokens, [question], llm_tok, bert_tok, limit, cfg["max_text_len"],
                                video_at, cfg["qformer_text_input"], a.max_new_tokens, a.temperature, a.top_p)[0]
    if a.question.strip():
        reason = too_long(a.question)
        check(not reason, f"--question: {reason}")
        answer = ask(a.question)
        print(answer)
        return answer
    print(f"{a.video}: ask about the video (Ctrl-D to quit)")
    while True:
        try:
            q = input("> ").strip()
        except EOFError:                                     # Ctrl-D or the end of piped input: the chat is over
            print()
            return None
        if not q:
            continue
        reason = too_long(q)
        print(reason if reason else ask(q), file=sys.stderr if reason else sys.stdout)


if __name__ == "__main__":
    cli(main)
