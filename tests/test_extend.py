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
from zhllama.demo import tiny


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


@pytest.mark.parametrize("tied", [False, True], ids=["untied-mean-head", "tied"])
def test_extend_keeps_base_rows_and_initialises_new_rows_from_subwords(tmp_path, request, merged_dir, merged_sp, tied):
    model_dir = request.getfixturevalue("tiny_tied_model_dir" if tied else "tiny_model_dir")
    out = extend(tmp_path, model_dir, merged_dir, "subword-mean", "--head-init", "mean")
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
    assert figures["head_init"] == (None if tied else "mean")
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer.model").is_file()


def rest_logprob(model, bos_id: int, ids: list[int]) -> float:
    """log P(ids[1:] | BOS, ids[0]) under ``model``, one unpadded sequence."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([[bos_id, *ids]])).logits[0].log_softmax(-1)
    return sum(float(logprobs[t + 1, ids[t + 1]]) for t in range(len(ids) - 1))


def test_logprob_head_rows_carry_the_base_probability_of_each_piece(
    tmp_path, tiny_model_dir, merged_dir, merged_sp, monkeypatch
):
    """Row p = row(first base piece) + offset(c_p)·u for one direction u, c_p measured by the
    base model: recompute c_p here one piece at a time (no batching, no padding) and check that
    every row's difference, divided by its offset, is the same vector. The random base's c_p
    fall below the floor from three pieces on, so the floor is lowered out of the way: every
    checked offset then depends on c_p."""
    from zhllama.pretrain import init as init_module
    from zhllama.pretrain.init import HEAD_LIFT, HEAD_LOGPROB_SCALE, subword_ids
    from zhllama.vocab.spmodel import load_sp_proto

    monkeypatch.setattr(init_module, "HEAD_LOGPROB_FLOOR", -1e9)
    out = extend(tmp_path, tiny_model_dir, merged_dir)
    figures = manifest(out)["figures"]
    assert figures["head_init"] == "logprob"
    assert figures["head_fit_positions"] > figures["new_rows"]
    assert 0.5 < figures["head_direction_mean_dot"] <= 1.0
    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    base_sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    base_head = load_file(tiny_model_dir / "model.safetensors")["lm_head.weight"]
    extended = load_file(out / "model.safetensors")
    head, embed = extended["lm_head.weight"], extended["model.embed_tokens.weight"]
    n = base_sp.get_piece_size()
    splits = subword_ids(load_sp_proto(tiny_model_dir, role="model"), load_sp_proto(merged_dir, role="tokenizer"))
    directions, lengths = [], set()
    for i, ids in enumerate(splits, start=n):
        if len(ids) < 2 or len(ids) in lengths:
            continue  # one piece per split length: batches are sorted and padded by length
        lengths.add(len(ids))
        offset = HEAD_LOGPROB_SCALE * rest_logprob(base_model, base_sp.bos_id(), ids) + HEAD_LIFT
        directions.append((head[i] - base_head[ids[0]]) / offset)
        torch.testing.assert_close(embed[i], embed[ids].mean(dim=0))  # the input side stays a mean
    assert len(directions) >= 3
    for direction in directions[1:]:
        torch.testing.assert_close(direction, directions[0], rtol=2e-3, atol=2e-5)
    assert directions[0].norm() > 0


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory, base_tokenizer_dir, chinese_corpus):
    """A tiny LLaMA that has learnt some Chinese through byte fallback, its training text and
    held-out text."""
    work = tmp_path_factory.mktemp("trained")
    lines = chinese_corpus.read_text(encoding="utf-8").splitlines()
    held_out = tiny.write_lines(work / "held_out.txt", lines[-60:])
    train = tiny.write_lines(work / "train.txt", lines[:-60])
    base = tiny.write_tiny_llama(work / "base", base_tokenizer_dir)
    tiny.pretrain_tiny_llama(base, lines[:-60], steps=150, block_size=64, batch_size=16)
    return base, train, held_out


def bits_per_character(model, held_out) -> float:
    from zhllama.pretrain import EvalOptions, evaluate_chain

    options = EvalOptions(model=model, data=[str(held_out)], block_size=64)
    return evaluate_chain(options).corpora[str(held_out)]["bits_per_character"]


def test_logprob_head_starts_better_than_a_mean_head(tmp_path, trained_base, merged_dir):
    """The point of --head-init logprob, on a tiny LLaMA that has learnt some Chinese through
    byte fallback: at step 0 its bits per character on held-out text are lower than with
    averaged head rows, and within 10% of the base model's."""
    base, _, held_out = trained_base
    (tmp_path / "mean-head").mkdir()
    bits = {
        "base": bits_per_character(base, held_out),
        "logprob": bits_per_character(extend(tmp_path, base, merged_dir, "subword-mean"), held_out),
        "mean": bits_per_character(extend(tmp_path / "mean-head", base, merged_dir, "subword-mean", "--head-init", "mean"), held_out),
    }
    assert bits["logprob"] < bits["mean"] - 0.1, bits
    assert bits["logprob"] < bits["base"] * 1.10, bits


def test_stage0_trains_the_new_rows_only(tmp_path, trained_base, merged_dir, capsys):
    """--init-corpus: stage 0 lowers the held-out loss of its sample, moves only the new rows (base rows
    bit-identical, padding rows the base mean) and starts no more than 5% above the base model's
    bits per character on held-out text; the summary says what it did."""
    base, train, held_out = trained_base
    out = extend(tmp_path, base, merged_dir, "subword-mean", "--init-corpus", train, "--init-steps", "40", "--init-blocks", "256")
    assert "stage 0: 40 steps" in capsys.readouterr().out
    figures = manifest(out)["figures"]
    assert figures["stage0_loss_last"] < figures["stage0_loss_first"]
    assert figures["stage0_held_out_nll_kept"] < figures["stage0_held_out_nll_start"]
    assert figures["stage0_kept_step"] > 0 and figures["stage0_tokens"] > 0
    # the replay of the base's own text is read too, and the rows kept leave it where it was
    assert figures["stage0_replay_blocks"] > 0
    assert figures["stage0_replay_nll_kept"] <= figures["stage0_replay_nll_start"] * 1.005
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    (tmp_path / "closed").mkdir()
    closed = load_file(extend(tmp_path / "closed", base, merged_dir) / "model.safetensors")
    n, size = figures["base_vocab_size"], figures["tokenizer_size"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[name][:n], before[name])
        assert not torch.allclose(after[name][n:size], closed[name][n:size])  # stage 0 moved them
        torch.testing.assert_close(after[name][size:], before[name].mean(dim=0).expand(len(after[name]) - size, -1))
    assert bits_per_character(out, held_out) < bits_per_character(base, held_out) * 1.05


def test_stage0_on_a_tied_model_keeps_it_tied(tmp_path, tiny_tied_model_dir, merged_dir, chinese_corpus):
    out = extend(tmp_path, tiny_tied_model_dir, merged_dir, "subword-mean", "--init-corpus", chinese_corpus, "--init-steps", "3", "--init-blocks", "16")
    after, before = load_file(out / "model.safetensors"), load_file(tiny_tied_model_dir / "model.safetensors")
    assert "lm_head.weight" not in after
    n = manifest(out)["figures"]["base_vocab_size"]
    assert torch.equal(after["model.embed_tokens.weight"][:n], before["model.embed_tokens.weight"])
    assert manifest(out)["inputs"]["init_corpus"]


def test_each_new_piece_splits_into_base_pieces_of_its_text(tiny_model_dir, merged_dir, merged_sp):
    from zhllama.pretrain.init import subword_ids
    from zhllama.vocab.spmodel import load_sp_proto

    base_sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    base_rows = base_sp.get_piece_size()
    splits = subword_ids(load_sp_proto(tiny_model_dir, role="model"), load_sp_proto(merged_dir, role="tokenizer"))
    text = "我们今天去北京看看。Hello 2024"
    ids = merged_sp.encode(text)
    assert any(i >= base_rows for i in ids)
    spelled = [p for i in ids for p in ([i] if i < base_rows else splits[i - base_rows])]
    assert base_sp.decode(spelled) == merged_sp.decode(ids) == text


def test_stage0_blocks_start_with_bos_and_cover_the_sample(merged_sp):
    from zhllama.pretrain.stage0 import Stage0Settings, sample_blocks

    single = next(t for t in ("好", "的", "。", "a") if len(merged_sp.encode(t)) == 1)
    texts = ["我们今天去北京看看。" * 20, "你好", single]
    settings = Stage0Settings(steps=1, batch_size=1, block_size=16, max_blocks=100)
    blocks = sample_blocks(texts, merged_sp, settings, context=12)
    assert all(b[0] == merged_sp.bos_id() and 2 < len(b) <= 12 for b in blocks[:-1])
    whole = [i for b in blocks[:-1] for i in b[1:]]
    assert whole == merged_sp.encode(texts[0])[: len(whole)] and len(whole) >= len(merged_sp.encode(texts[0])) - 1
    assert blocks[-1] == [merged_sp.bos_id()] + merged_sp.encode("你好")  # a one-token document: nothing to predict
    assert len(sample_blocks(texts, merged_sp, Stage0Settings(1, 1, 16, max_blocks=2), context=12)) == 2


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
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged_dir, "--out", tmp_path / "o", "--device", "nodevice"], expect=1)
    err = capsys.readouterr().err
    assert "--device nodevice" in err and len(err.strip().splitlines()) == 1
    empty = tiny.write_lines(tmp_path / "empty.txt", [])
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged_dir, "--out", tmp_path / "o", "--init-corpus", empty], expect=1)
    err = capsys.readouterr().err
    assert "empty.txt" in err and "no non-empty documents" in err and len(err.strip().splitlines()) == 1
    run(["extend", "--model", tiny_model_dir, "--tokenizer", merged_dir, "--out", tmp_path / "o", "--init", "random", "--init-corpus", empty], expect=1)
    assert "--init-corpus" in capsys.readouterr().err
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
