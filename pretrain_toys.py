"""pretrain_toys.py: toy stand-ins for the pre-trained checkpoints the official recipe starts from.

Stage 2 starts its text encoder from bert-large-uncased (MM/configs/model.py:12-18) and stage 3 its Q-Former
from bert-base-uncased (VC2/models/blip2/blip2.py:53) and its LLM from Mistral-7B
(VC2/scripts/videochat_mistral/config_7b_stage3.py:38). Random networks in their place make matching and the frozen
LLM of stage 3 unlearnable at toy scale, so ToyWorld gets small pre-trained ones, trained on its training texts in
seconds and saved with Hugging Face key names, to be loaded through the very functions that load the real checkpoints
(load_bert, load_llm). The stage scripts call these when the toy checkpoints are missing.

The four toy checkpoints (these two and the two toy teachers of teachers.py) are shipped in toys/, as the real
ones are downloaded; this rebuilds all four from ToyWorld (seed 0), bit for bit on the same machine and thread count:

    python pretrain_toys.py --data=data/toyworld --out=toys      # about 15 minutes on 2 CPU cores
"""
import sys
from pathlib import Path

import torch

from common import fit, print0
from data import build_chat, load_jsonl
from losses import answer_loss, mask_tokens, token_cross_entropy
from checkpoints import bert_key_map, llm_key_map
from model import LLM, TextEncoder


def _texts(data_root):
    recs, _ = load_jsonl(Path(data_root) / "train.jsonl")
    texts = [r[k] for r in recs for k in ("caption", "audio_caption", "asr", "avs_caption") if r.get(k)]
    return recs, texts + [f"{qa['q']} {qa['a']}" for r in recs for qa in r.get("qa", [])]


def pretrain_toy_bert(data_root, tok, tcfg, path, steps=150, batch=64, lr=1e-3, max_len=24, seed=0):
    """The stand-in for bert-*-uncased: masked LM (15%, 80/10/10) on ToyWorld's training texts, every
    layer text-only as in BERT's own pre-training. About 15 s on 2 CPU cores."""
    _, texts = _texts(data_root)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = TextEncoder(tcfg)

    def loss_at(step):
        ids, mask = tok.encode([texts[i] for i in torch.randint(len(texts), (batch,), generator=g)], max_len)
        corrupted, labels = mask_tokens(ids, mask, len(tok), tok.mask_id, tok.cls_id, prob=0.15)
        h = enc.forward_fusion(enc.forward_text(corrupted, mask), mask, memory=None)
        return token_cross_entropy(enc.mlm_logits(h), labels)
    loss = fit("toy BERT (masked LM on ToyWorld text)", enc.parameters(), loss_at, steps, lr)
    key_map = bert_key_map(enc.cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key_map[k]: v for k, v in enc.state_dict().items() if ".cross" not in k}, path)
    print0(f"toy BERT saved to {path} (masked-LM loss {loss:.3f} after {steps} steps)")
    return path


def pretrain_toy_llm(data_root, tok, lcfg, path, n_visual=16, steps=1000, batch=64, lr=2e-3, max_len=48, seed=0):
    """The stand-in for Mistral-7B: next-token training on ToyWorld's texts in the chat format, where the n_visual
    video slots hold the words for what the clip shows (its five attribute values) in random order at random slots.
    A real LLM reads whatever its context says; this teaches the toy one to read its video slots, so that stage 3's
    bridge has something to write to (sub-stage 2 keeps the LLM frozen). Two earlier versions failed there
    (results/toyworld_motion.md): the caption itself in the slots, 250 steps, left the LLM unable to answer direction
    even from the true caption; 1000 steps taught it to copy the caption's sentence, template and word order
    included, which a bridge cannot write from a video. About 3 minutes on 2 CPU cores."""
    from data import ATTRIBUTES, CAPTION_PROMPTS
    recs, _ = _texts(data_root)
    convs = [(r, qa["q"], qa["a"]) for r in recs for qa in r.get("qa", []) if r.get("attrs")]
    convs += [(r, p, r["caption"]) for r in recs if r.get("attrs") and r.get("caption") for p in CAPTION_PROMPTS]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    llm = LLM(lcfg)

    def loss_at(step):
        rows = []
        for i in torch.randint(len(convs), (batch,), generator=g).tolist():
            rec, q, a = convs[i]
            ids, labels, mask, at = build_chat(tok, [(q, a)], n_visual, max_len)
            words = [w for k in ATTRIBUTES for w in tok.encode(rec["attrs"][k])]       # what the clip shows
            words = [words[j] for j in torch.randperm(len(words), generator=g).tolist()]
            ids[at + torch.randperm(n_visual, generator=g)[:len(words)]] = torch.tensor(words)
            rows.append((ids, labels, mask))
        ids, labels, mask = (torch.stack([r[k] for r in rows]) for k in range(3))
        L = int(mask.sum(1).max())                             # drop the padding common to the batch
        ids, labels, mask = ids[:, :L], labels[:, :L], mask[:, :L]
        logits, _ = llm(llm.embed_tokens(ids), mask)
        return answer_loss(logits, labels)
    loss = fit("toy LLM (next token on ToyWorld text)", llm.parameters(), loss_at, steps, lr)
    key_map = llm_key_map(llm)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key_map[k]: v for k, v in llm.state_dict().items()}, path)
    print0(f"toy LLM saved to {path} (answer loss {loss:.3f} after {steps} steps)")
    return path


if __name__ == "__main__":
    from dataclasses import replace
    from data import ToyLLMTokenizer, WordPieceTokenizer, make_toyworld
    from model import LLM_PRESETS, QFORMER_PRESETS, text_preset
    from teachers import pretrain_toy_teachers
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    data, out = args.get("data", "data/toyworld"), Path(args.get("out", "toys"))
    torch.set_num_threads(int(args.get("threads", 2)))   # the shipped files were made with 2 threads
    make_toyworld(data)
    pretrain_toy_teachers(data, out)
    bert_tok = WordPieceTokenizer(Path(data) / "vocab.txt")
    pretrain_toy_bert(data, bert_tok, text_preset("toy", vocab_size=len(bert_tok)), out / "toy_bert.pt")
    llm_tok = ToyLLMTokenizer(Path(data) / "vocab.txt")
    pretrain_toy_llm(data, llm_tok, replace(LLM_PRESETS["toy"], vocab_size=len(llm_tok)), out / "toy_llm.pt",
                     n_visual=QFORMER_PRESETS["toy"].num_query + QFORMER_PRESETS["toy"].extra_query)
