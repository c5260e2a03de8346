"""chat.py: ask a trained stage-3 model about a video.

    python chat.py --ckpt=out/stage3/ckpt.pt --video=data/toyworld/videos/val_00003.webp \\
        --question="what color is the object?"
    python chat.py --ckpt=out/stage3/ckpt.pt --video=my_clip.mp4                  # interactive
    python chat.py ... --temperature=0.7 --top_p=0.9                               # sampling, not greedy

The video is read and sampled like a held-out clip (middle frame of each segment, resized,
ImageNet-normalised); the answer is decoded with the KV cache, LoRA merged into the LLM.
"""
import argparse
from pathlib import Path

import torch

from common import load_checkpoint, pick_device
from data import WordPieceTokenizer, frame_indices, load_llm_tokenizer, read_frames, video_index, video_transform
from evaluate import answer_questions
from model import Stage3Model, merge_lora


def load_chat_model(ckpt_path, device):
    """A stage-3 checkpoint -> (model in eval mode with LoRA merged, its config dict)."""
    ck = load_checkpoint(ckpt_path)
    if ck.get("stage") != 3:
        raise SystemExit(f"{ckpt_path} is a stage-{ck.get('stage')} checkpoint; chat needs stage 3 (train_stage3.py)")
    model = Stage3Model.from_config(ck["model_config"])
    model.load_state_dict(ck["model"])
    merge_lora(model.llm)
    return model.to(device).eval(), ck["config"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/stage3/ckpt.pt")
    p.add_argument("--video", required=True, help="frame folder, GIF, WebP, or mp4 (PyAV)")
    p.add_argument("--question", default=None, help="omit for an interactive session")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    model, cfg = load_chat_model(a.ckpt, device)
    data = Path(cfg["data"])
    bert_tok = WordPieceTokenizer(cfg["vocab"] or data / "vocab.txt")
    llm_tok = load_llm_tokenizer(cfg["llm_tokenizer"] or f"toy:{data / 'vocab.txt'}")
    vcfg = model.vision_encoder.cfg
    frames = read_frames(a.video, lambda n: frame_indices(n, vcfg.num_frames, train=False))
    video = video_transform(frames, vcfg.img_size, train=False)[None].to(device)
    video_at = video_index(llm_tok)
    with torch.no_grad():
        tokens = model.video_tokens(video)

    def ask(question):
        return answer_questions(model, tokens, [question], llm_tok, bert_tok, cfg["max_llm_len"], cfg["max_text_len"],
                                video_at, cfg["qformer_text_input"], a.max_new_tokens, a.temperature, a.top_p)[0]
    if a.question:
        answer = ask(a.question)
        print(answer)
        return answer
    print(f"{a.video}: ask about the video (empty line to quit)")
    while True:
        q = input("> ").strip()
        if not q:
            return None
        print(ask(q))


if __name__ == "__main__":
    main()
