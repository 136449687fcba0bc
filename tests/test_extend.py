"""zhllama extend: original rows bit-identical, new rows initialised from their subwords,
padding rows never win, tied stays tied, bad tokenizers refused."""

from __future__ import annotations

import math

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pretrain_fixtures import make_merged_tokenizer, manifest, run
from zhllama import tiny


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, base_tokenizer_dir, chinese_corpus):
    return make_merged_tokenizer(tmp_path_factory.mktemp("merged"), base_tokenizer_dir, chinese_corpus)


@pytest.fixture(scope="module")
def merged_sp(merged_dir):
    return spm.SentencePieceProcessor(model_file=str(merged_dir / "tokenizer.model"))


def extend(tmp_path, model_dir, merged_dir, init="subword-mean", *extra):
    out = tmp_path / f"extended-{init}"
    run(["extend", "--model", model_dir, "--tokenizer", merged_dir, "--out", out, "--init", init, *extra])
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_extend_keeps_base_rows_and_initialises_new_rows_from_subwords(tmp_path, request, merged_dir, merged_sp, tied):
    model_dir = request.getfixturevalue("tiny_tied_model_dir" if tied else "tiny_model_dir")
    out = extend(tmp_path, model_dir, merged_dir)
    base, extended = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    base_sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    n, size = base_sp.get_piece_size(), merged_sp.get_piece_size()
    rows = math.ceil(size / 64) * 64

    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert ("lm_head.weight" in extended) == (not tied)
    for name in names:
        assert extended[name].shape == (rows, base[name].shape[1])
        assert torch.equal(extended[name][:n], base[name])  # bit-identical
    # a new piece "▁xy": the base tokenizer splits " xy" (its dummy prefix gives the ▁) into pieces
    # whose rows it averages, in the input embeddings and the LM head alike
    checked = 0
    for i in range(n, size):
        piece = merged_sp.id_to_piece(i)
        if piece.startswith("▁") and len(piece) > 1 and "▁" not in piece[1:]:
            ids = base_sp.encode(piece[1:])
            for name in names:
                torch.testing.assert_close(extended[name][i], base[name][ids].mean(dim=0))
            checked += 1
    # and one without ▁: split as it stands (no dummy prefix added)
    plain = next(i for i in range(n, size) if not merged_sp.id_to_piece(i).startswith("▁"))
    with_prefix = base_sp.encode("a" + merged_sp.id_to_piece(plain))
    expected = with_prefix[len(base_sp.encode("a")) :]
    if base_sp.decode(expected) == merged_sp.id_to_piece(plain):
        torch.testing.assert_close(extended[names[0]][plain], base[names[0]][expected].mean(dim=0))
    assert checked > 0

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.vocab_size == rows
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    figures = manifest(out)["figures"]
    assert figures["base_vocab_size"] == n
    assert figures["new_rows"] == size - n
    assert figures["padding_rows"] == rows - size
    assert figures["tied_embeddings"] == tied
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()


@pytest.mark.parametrize("init", ["subword-mean", "mean", "random"])
def test_padding_rows_never_win(tmp_path, tiny_model_dir, merged_dir, merged_sp, init):
    out = extend(tmp_path, tiny_model_dir, merged_dir, init)
    head = load_file(out / "model.safetensors")["lm_head.weight"]
    size = merged_sp.get_piece_size()
    assert head.shape[0] > size  # there are padding rows to test
    hidden = torch.randn(4000, head.shape[1]) * torch.logspace(-2, 2, 4000).unsqueeze(1)
    logits = hidden @ head.T
    assert logits.argmax(dim=1).max() < size
    assert (logits[:, size:].max(dim=1).values < logits[:, :size].max(dim=1).values).all()


def test_init_methods_differ_and_pad_multiple(tmp_path, tiny_model_dir, merged_dir, merged_sp):
    n, size = 1000, merged_sp.get_piece_size()
    rows = {}
    for init in ("subword-mean", "mean", "random"):
        out = extend(tmp_path, tiny_model_dir, merged_dir, init, "--pad-to-multiple-of", "1")
        rows[init] = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
        assert rows[init].shape[0] == size
        assert manifest(out)["figures"]["init"] == init
    assert not torch.allclose(rows["subword-mean"][n:], rows["random"][n:])
    assert not torch.allclose(rows["mean"][n:], rows["random"][n:])


def test_mean_init_samples_around_the_old_rows_mean(tmp_path, tiny_model_dir, merged_dir):
    """transformers' mean resizing: new rows near the mean of the old ones. The tiny model's rows
    average about 0 (as random rows would), so shift them first to tell the two apart."""
    import shutil

    from zhllama.chain import TOKENIZER_FILES

    shifted = tmp_path / "shifted"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight += 1.0
    model.save_pretrained(str(shifted))
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, shifted / name)
    n = 1000
    for init, near_old_mean in (("mean", True), ("random", False)):
        out = extend(tmp_path, shifted, merged_dir, init, "--pad-to-multiple-of", "1")
        matrix = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
        gap = (matrix[n:].mean(0) - matrix[:n].mean(0)).abs().max().item()
        assert (gap < 0.05) is near_old_mean, (init, gap)


def test_tokenizer_that_does_not_extend_the_model_is_refused(tmp_path, tiny_model_dir, capsys):
    other = tiny.write_base_tokenizer(tmp_path / "other", seed=3)  # same size, different pieces
    out = tmp_path / "out"
    run(["extend", "--model", tiny_model_dir, "--tokenizer", other, "--out", out], expect=1)
    err = capsys.readouterr().err
    assert "does not extend" in err and "piece" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_model_and_bad_flags(tmp_path, merged_dir, tiny_model_dir, capsys):
    run(["extend", "--model", tmp_path / "nope", "--tokenizer", merged_dir, "--out", tmp_path / "o"], expect=1)
    assert "does not exist" in capsys.readouterr().err
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged_dir, "--out", tmp_path / "o", "--pad-to-multiple-of", "0"], expect=1)
    assert "--pad-to-multiple-of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.real_assets
def test_extend_stories260k_tied(tmp_path, assets, chinese_corpus):
    base = assets / "models" / "stories260K"
    merged = make_merged_tokenizer(tmp_path, base, chinese_corpus)
    out = extend(tmp_path, base, merged)
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.embed_tokens.weight"
    assert torch.equal(after[name][:512], before[name])
    assert "lm_head.weight" not in after
    figures = manifest(out)["figures"]
    assert figures["base_vocab_size"] == 512 and figures["tied_embeddings"] is True
    assert figures["embedding_rows"] % 64 == 0
