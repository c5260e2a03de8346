"""chat.py: the checkpoint carries its tokenizers (chat runs from any folder, no data folder needed), older
checkpoints find theirs beside them or name the option to pass, and every bad option or input is one line."""
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what color is the object?"


@pytest.fixture(scope="module")
def trained(toyworld, toy_pretrained, tmp_path_factory):
    """A tiny stage-3 run (one sub-stage-3 step): its final and sub-stage checkpoints, and a clip."""
    from train_stage3 import main
    out = tmp_path_factory.mktemp("chat_s3")
    main([f"--data={toyworld}", f"--out_dir={out}", f"--qformer_bert={toy_pretrained['bert']}",
          f"--llm_ckpt={toy_pretrained['llm']}", "--max_steps=(0,0,1)", "--num_frames=(2,2,2)", "--batch_size=4",
          "--eval=False"])
    return {"ckpt": out / "ckpt.pt", "sub": out / "substage3" / "ckpt.pt",
            "video": toyworld / "videos" / "val_00000.webp"}


def _chat(trained, *extra, ckpt=None):
    import chat
    return chat.main([f"--ckpt={ckpt or trained['ckpt']}", f"--video={trained['video']}", *extra])


def _moved(trained, folder, keep_tokenizers):
    """The checkpoint as a run elsewhere wrote it: data recorded as the relative 'data/tw', which does not
    exist where the test runs; without the saved tokenizers it is a checkpoint from before they were saved."""
    ck = torch.load(trained["ckpt"], weights_only=False)
    ck["config"]["data"] = "data/tw"
    if not keep_tokenizers:
        del ck["tokenizers"]
    path = folder / "out" / "stage3" / "ckpt.pt"
    path.parent.mkdir(parents=True)
    torch.save(ck, path)
    return path


def test_the_checkpoint_carries_its_tokenizers_and_chat_runs_anywhere(trained, toyworld, tmp_path, monkeypatch):
    from checkpoints import stage3_tokenizers
    from data import ToyLLMTokenizer, WordPieceTokenizer
    bert, llm = WordPieceTokenizer(toyworld / "vocab.txt"), ToyLLMTokenizer(toyworld / "vocab.txt")
    for path in (trained["ckpt"], trained["sub"]):                     # both checkpoints train_stage3 writes
        ck = torch.load(path, weights_only=False)
        assert ck["tokenizers"]["vocab"] == bert.itos and ck["tokenizers"]["llm_vocab"] == bert.itos
        b, l = stage3_tokenizers(ck, path)
        assert b.itos == bert.itos and l.itos == llm.itos
        assert l.encode(f"[INST] {QUESTION} [/INST]") == llm.encode(f"[INST] {QUESTION} [/INST]")
    expected = _chat(trained, f"--question={QUESTION}")
    moved = _moved(trained, tmp_path / "elsewhere", keep_tokenizers=True)
    monkeypatch.chdir(tmp_path)                                        # no data/tw here nor above the checkpoint
    assert _chat(trained, f"--question={QUESTION}", ckpt=moved) == expected


def test_an_older_checkpoint_finds_its_files_beside_it_or_names_the_option(trained, toyworld, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    old = _moved(trained, repo, keep_tokenizers=False)                 # repo/out/stage3/ckpt.pt
    expected = _chat(trained, f"--question={QUESTION}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"holds no BERT vocabulary .* pass --vocab=<the vocab.txt"):
        _chat(trained, f"--question={QUESTION}", ckpt=old)
    vocab = toyworld / "vocab.txt"
    with pytest.raises(ConfigError, match=r"holds no LLM tokenizer .* pass --llm_tokenizer=toy:<the file"):
        _chat(trained, f"--question={QUESTION}", f"--vocab={vocab}", ckpt=old)
    assert _chat(trained, f"--question={QUESTION}", f"--vocab={vocab}", f"--llm_tokenizer=toy:{vocab}",
                 ckpt=old) == expected
    (repo / "data" / "tw").mkdir(parents=True)                         # the training folder above the checkpoint
    shutil.copy(vocab, repo / "data" / "tw" / "vocab.txt")
    assert _chat(trained, f"--question={QUESTION}", ckpt=old) == expected


def test_an_empty_question_is_an_error_and_end_of_input_ends_the_chat(trained, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="--question is empty: ask something, or leave --question out"):
        _chat(trained, "--question=")
    with pytest.raises(ConfigError, match="--question is empty"):
        _chat(trained, "--question=  ")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"\n   \n{QUESTION}\n"))      # blank lines, a question, EOF
    assert _chat(trained) is None
    out = capsys.readouterr().out
    answer = _chat(trained, f"--question={QUESTION}")
    assert out.count("> ") == 4 and out.rstrip("\n").endswith(f"> {answer}\n> ")   # one answer, then EOF


@pytest.mark.parametrize("option, says", [
    ("--max_new_tokens=0", "--max_new_tokens must be at least 1, got 0"),
    ("--temperature=-0.5", "--temperature must be >= 0"),
    ("--top_p=0", r"--top_p must be in \(0, 1\], got 0"),
    ("--top_p=1.5", r"--top_p must be in \(0, 1\], got 1.5"),
    ("--max_llm_len=-1", "--max_llm_len must be >= 0"),
    ("--video=missing.webp", "--video=missing.webp: no such file or folder"),
    ("--ckpt=missing.pt", "--ckpt=missing.pt: no such file"),
    ("--device=gpu", "--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("--max_new_token=4", "unknown option --max_new_token; did you mean --max_new_tokens"),
])
def test_bad_options_are_named(trained, option, says):
    with pytest.raises(ConfigError, match=says):
        _chat(trained, f"--question={QUESTION}", option)


def test_not_a_stage3_checkpoint_or_other_weights_are_named(trained, tmp_path):
    torch.save({"stage": 2, "model": {}}, tmp_path / "s2.pt")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "raw.pt")
    with pytest.raises(ConfigError, match="s2.pt is a stage-2 checkpoint; chat needs a stage-3 checkpoint"):
        _chat(trained, "--question=x", ckpt=tmp_path / "s2.pt")
    with pytest.raises(ConfigError, match="raw.pt is no checkpoint of a layout we know; chat needs a stage-3"):
        _chat(trained, "--question=x", ckpt=tmp_path / "raw.pt")
    ck = torch.load(trained["ckpt"], weights_only=False)
    ck["model"].pop("llm.norm.weight")                                 # as from another version of the code
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: its weights do not fit .*: missing llm.norm.weight; "
                                              r"unexpected none; other shapes none"):
        _chat(trained, "--question=x", ckpt=tmp_path / "other.pt")


def test_a_long_question_names_what_the_chat_user_can_change(trained, monkeypatch, capsys):
    long = " ".join([QUESTION] * 8)
    with pytest.raises(ConfigError, match=r"--question: the question is \d+ tokens, room is left for \d+: prompts "
                                          r"hold 48 tokens \(the checkpoint's max_llm_len\), \d+ of them the chat "
                                          r"format with 16 video slots; ask a shorter question, or pass "
                                          r"--max_llm_len=\d+") as e:
        _chat(trained, f"--question={long}")
    needed = str(e.value).split("--max_llm_len=")[1].split()[0]
    assert isinstance(_chat(trained, f"--question={long}", f"--max_llm_len={needed}"), str)   # exactly enough
    with pytest.raises(ConfigError, match="ask a shorter question"):
        _chat(trained, f"--question={long}", f"--max_llm_len={int(needed) - 1}")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\n{QUESTION}\n"))        # interactive: say so, go on
    assert _chat(trained) is None
    out, err = capsys.readouterr()
    assert err.count("ask a shorter question") == 1 and out.count("> ") == 3


def test_help_lists_every_option(capsys):
    import chat
    with pytest.raises(SystemExit) as e:
        chat.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "interactive" in out
    for line in ("--max_new_tokens=24", "--top_p=1.0", "--vocab=''", "--llm_tokenizer=''", "--max_llm_len=0"):
        assert line in out, line


def test_the_command_gives_one_line_and_exit_code_2_or_ends_cleanly_at_eof(trained):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "chat.py"), f"--ckpt={trained['ckpt']}",
                                     f"--video={trained['video']}", *a], capture_output=True, text=True,
                                    timeout=120, stdin=subprocess.DEVNULL, env={**__import__("os").environ,
                                                                                "OMP_NUM_THREADS": "1"})
    r = run("--question=what", "--max_new_tokens=0")
    assert r.returncode == 2 and r.stderr == "error: --max_new_tokens must be at least 1, got 0\n", r.stderr
    r = run()                                                          # interactive, stdin at EOF at once
    assert r.returncode == 0 and r.stderr == "" and r.stdout.endswith("> \n"), (r.stdout, r.stderr)
