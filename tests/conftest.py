"""Shared fixtures: a tiny ToyWorld on disk (seconds), and the 2-process runner for DDP tests."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def toyworld(tmp_path_factory):
    from data import make_toyworld
    return make_toyworld(tmp_path_factory.mktemp("toyworld"), n_train=48, n_val=16, seed=0, workers=1,
                         verbose=False)


@pytest.fixture(scope="session")
def toy_pretrained(toyworld, tmp_path_factory):
    """Tiny toy BERT and toy LLM checkpoints (a few steps: the tests need their layout, not their skill)."""
    from dataclasses import replace
    from data import ToyLLMTokenizer, WordPieceTokenizer
    from model import LLM_PRESETS, text_preset
    from pretrain_toys import pretrain_toy_bert, pretrain_toy_llm
    out = tmp_path_factory.mktemp("pretrained")
    bert_tok, llm_tok = WordPieceTokenizer(toyworld / "vocab.txt"), ToyLLMTokenizer(toyworld / "vocab.txt")
    bert = pretrain_toy_bert(toyworld, bert_tok, text_preset("toy", vocab_size=len(bert_tok)), out / "bert.pt", steps=30)
    llm = pretrain_toy_llm(toyworld, llm_tok, replace(LLM_PRESETS["toy"], vocab_size=len(llm_tok)), out / "llm.pt",
                           n_visual=16, steps=30)
    return {"bert": bert, "llm": llm}


def run_two_ranks(fn, tmp_path, *args, timeout=240, world=2):
    """Run fn(rank, world, init_file, out_path, *args) in `world` spawned processes over gloo and return
    their results (what each saved with torch.save to out_path). Robust to the rare abort of a rank
    at interpreter exit after destroy_process_group: a rank counts as done once its result file is
    complete, whatever its exit code; a missing result fails with the exit codes."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    init = tmp_path / "dist_init"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [ctx.Process(target=fn, args=(r, world, str(init), str(outs[r]), *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    missing = [r for r in range(world) if not outs[r].exists()]
    assert not missing, f"ranks {missing} gave no result; exit codes {[p.exitcode for p in procs]}"
    return [torch.load(o, weights_only=False) for o in outs]


def save_result(obj, out):
    """Write a rank's result atomically (complete before any exit-time trouble)."""
    torch.save(obj, out + ".tmp")
    os.replace(out + ".tmp", out)


def assert_picture(path, min_size=(200, 150)):
    """A real picture: a PNG file of at least min_size pixels with something drawn (more than one colour)."""
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 0]) > 1, f"{path} is blank"
