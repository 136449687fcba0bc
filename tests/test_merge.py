"""zhllama merge: a chain of peft adapters baked into one checkpoint equals the chain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_fixtures import chain_adapters, chain_model, load_merged, logits, make_adapter
from zhllama.chain import load_chain
from zhllama.cli import main
from zhllama.provenance import file_sha256

NEW_ROWS = list(range(900, 1000))  # as if `zhllama extend` had added the last 100 pieces
IDS = [1, 5, 17, 250, 901, 950, 999, 42, 3]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["untied", "tied"])
def chain(request, tmp_path_factory, tiny_model_dir, tiny_tied_model_dir):
    model_dir = tiny_tied_model_dir if request.param == "tied" else tiny_model_dir
    work = tmp_path_factory.mktemp(f"chain_{request.param}")
    return model_dir, chain_adapters(model_dir, work, tied=request.param == "tied", new_rows=NEW_ROWS)


def merge_args(model_dir: Path, adapters: list[Path], out: Path, *extra: str) -> list[str]:
    return ["merge", "--model", str(model_dir), *[a for adapter in adapters for a in ("--adapter", str(adapter))], "--out", str(out), *extra]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors


def test_merged_logits_equal_the_peft_chain(chain, tmp_path):
    model_dir, adapters = chain
    out = tmp_path / "merged"
    assert main(merge_args(model_dir, adapters, out, "--dtype", "float32", "--max-shard-size", "60KB")) == 0

    reference = load_chain(model_dir, adapters).model
    merged = load_merged(out)
    assert torch.allclose(logits(merged, IDS), logits(reference, IDS), atol=1e-5, rtol=0)
    # the chain did change the model, including the new rows
    assert not torch.allclose(logits(load_merged(model_dir), IDS), logits(merged, IDS), atol=1e-3)

    tied = "tied" in model_dir.name
    tensors = weights(out)
    assert ("lm_head.weight" in tensors) is (not tied)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == tensors["model.embed_tokens.weight"].shape[0] == 1000
    assert config["tie_word_embeddings"] is tied
    for name in ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "zhllama.json").read_text())
    assert manifest["template"] == "alpaca"
    assert manifest["chain"]["adapters"] == [str(a.resolve()) for a in adapters]
    assert {name: entry["sha256"] for name, entry in manifest["outputs"].items()} == {s: file_sha256(out / s) for s in shards}
    assert not list(tmp_path.glob(".merged.tmp-*"))


def test_only_targeted_tensors_change_and_rows_are_replaced(chain, tmp_path):
    model_dir, adapters = chain
    out = tmp_path / "merged"
    assert main(merge_args(model_dir, adapters[:1], out, "--dtype", "float32")) == 0
    base, merged = weights(model_dir), weights(out)
    # one shard, and still an index naming it
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == dict.fromkeys(merged, "model.safetensors")
    vocab_matrices = {"model.embed_tokens.weight", "lm_head.weight"} & base.keys()  # untied: both got new rows
    for name, tensor in merged.items():
        if name not in vocab_matrices:
            assert torch.equal(tensor, base[name]), name
    for name in vocab_matrices:
        assert torch.equal(merged[name][: NEW_ROWS[0]], base[name][: NEW_ROWS[0]])  # original ids never move
        assert not torch.equal(merged[name][NEW_ROWS], base[name][NEW_ROWS])


def test_sharded_input_gives_the_same_checkpoint(chain, tmp_path):
    model_dir, adapters = chain
    sharded = tmp_path / "sharded_base"
    load_merged(model_dir).save_pretrained(str(sharded), max_shard_size="50KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy2(model_dir / name, sharded / name)
    from_single, from_shards = tmp_path / "a", tmp_path / "b"
    assert main(merge_args(model_dir, adapters, from_single, "--dtype", "float32")) == 0
    # the adapters record the unsharded base's fingerprint; the same weights resharded are fine
    assert main(merge_args(sharded, adapters, from_shards, "--dtype", "float32", "--allow-base-mismatch")) == 0
    single, shards = weights(from_single), weights(from_shards)
    assert single.keys() == shards.keys()
    assert all(torch.equal(single[k], shards[k]) for k in single)


def test_half_precision_merge_verifies(chain, tmp_path):
    model_dir, adapters = chain
    out = tmp_path / "merged"
    assert main(merge_args(model_dir, adapters, out, "--dtype", "bfloat16", "--verify")) == 0
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    figures = json.loads((out / "zhllama.json").read_text())["figures"]
    assert 0 < figures["max_logit_diff"] <= figures["logit_tolerance"]
    # the deltas are applied in float32 and rounded once: the float32 merge, rounded
    full = tmp_path / "merged_fp32"
    assert main(merge_args(model_dir, adapters, full, "--dtype", "float32")) == 0
    rounded, half = {k: v.to(torch.bfloat16) for k, v in weights(full).items()}, weights(out)
    assert rounded.keys() == half.keys() and all(torch.equal(rounded[k], half[k]) for k in half)


def test_embedding_lora_and_modules_to_save(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    full = make_adapter(tiny_model_dir, [], LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), tmp_path / "full", seed=4)
    embed_lora = make_adapter(tiny_model_dir, [full], LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"]), tmp_path / "emb", seed=5)
    out = tmp_path / "merged"
    assert main(merge_args(tiny_model_dir, [full, embed_lora], out, "--dtype", "float32")) == 0
    reference = chain_model(tiny_model_dir, [full, embed_lora])
    assert torch.allclose(logits(load_merged(out), IDS), logits(reference, IDS), atol=1e-5, rtol=0)


def _refused(capsys, argv: list[str], out: Path, *expected: str, after_progress: bool = False) -> str:
    """Exit 1, one error line (after the progress bar when it fails mid-stream), nothing left behind."""
    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    err = lines[-1]
    assert (after_progress or len(lines) == 1) and err.startswith("zhllama: error: "), lines
    for text in expected:
        assert text in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


@pytest.fixture(scope="module")
def wider_vocab_model(tmp_path_factory, tiny_model_dir):
    """The tiny model extended by one row (as if extended with another tokenizer)."""
    model = load_merged(tiny_model_dir)
    model.resize_token_embeddings(1001)
    out = tmp_path_factory.mktemp("vocab1001")
    model.save_pretrained(str(out))
    return out


def test_adapter_for_another_vocab_is_refused(wider_vocab_model, tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, TrainableTokensConfig

    full = make_adapter(wider_vocab_model, [], LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]), tmp_path / "full", seed=6)
    (full / "zhllama.json").unlink()  # as if made by another tool: only the shapes can tell
    out = tmp_path / "merged"
    _refused(capsys, merge_args(tiny_model_dir, [full], out), out, str(full), "embed_tokens", "vocab 1000 vs 1001", "another (extended) model")

    rows = make_adapter(wider_vocab_model, [], TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1000]), tmp_path / "rows", seed=7)
    _refused(capsys, merge_args(tiny_model_dir, [rows], out, "--allow-base-mismatch"), out, "token row 1000", "1000 rows")


def test_adapter_for_another_base_is_refused_by_fingerprint(wider_vocab_model, tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig

    adapter = make_adapter(wider_vocab_model, [], LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", seed=8)
    out = tmp_path / "merged"
    _refused(capsys, merge_args(tiny_model_dir, [adapter], out), out, "fingerprint", str(adapter))


def test_adapter_for_another_architecture_is_refused(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    deeper = tmp_path / "deeper"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.config.num_hidden_layers = 3
    AutoModelForCausalLM.from_config(model.config).save_pretrained(str(deeper))
    adapter = make_adapter(deeper, [], LoraConfig(r=2, target_modules=["v_proj"]), tmp_path / "a", seed=9)
    (adapter / "zhllama.json").unlink()
    out = tmp_path / "merged"
    _refused(capsys, merge_args(tiny_model_dir, [adapter], out), out, "layers.2.self_attn.v_proj", "does not have")


def test_bad_options_are_refused_together(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    err = _refused(capsys, ["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "--out", str(out), "--max-shard-size", "big", "--gguf", "x.bin"], out)
    assert "--max-shard-size" in err and "--gguf" in err


def test_non_finite_adapter_and_half_precision_overflow_are_refused(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tiny_model_dir, [], LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", seed=10)
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    out = tmp_path / "merged"

    tensors[key] = torch.full_like(tensors[key], 300.0)  # delta = 2 * 300 * 300 * alpha/r: beyond float16
    tensors[key.replace("lora_A", "lora_B")] = torch.full_like(tensors[key.replace("lora_A", "lora_B")], 300.0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _refused(capsys, merge_args(tiny_model_dir, [adapter], out, "--dtype", "float16"), out, "overflow float16", "--dtype bfloat16", after_progress=True)

    tensors[key][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _refused(capsys, merge_args(tiny_model_dir, [adapter], out), out, str(adapter), key.removeprefix("base_model.model."), "NaN")


def test_lora_only_matrices_merge_in_row_blocks_as_whole_matrices(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Matrices that only LoRAs change are merged a block of rows at a time (merge.BLOCK_ROWS):
    with blocks that split every matrix unevenly, the weights equal W + Σ s·B@A applied to whole
    matrices, --verify still agrees exactly, an adapter that makes a row of a later block NaN is
    named, and the torch thread count merge lowers while it writes is restored either way."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from zhllama.merge import merge as merge_module
    from zhllama.merge.adapters import read_adapter

    first = make_adapter(tiny_model_dir, [], LoraConfig(r=2, target_modules=["q_proj", "down_proj", "embed_tokens"]), tmp_path / "a", seed=20)
    path = first / "adapter_model.safetensors"  # peft also saved the embedding whole: keep only the LoRA (stored transposed)
    save_file({k: v for k, v in load_file(str(path)).items() if ".lora_" in k}, str(path))
    second = make_adapter(tiny_model_dir, [first], LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj"]), tmp_path / "b", seed=21)
    monkeypatch.setattr(merge_module, "BLOCK_ROWS", 9)
    threads, while_merging = 2, []
    torch.set_num_threads(threads)  # the one_torch_thread fixture restores its own count after
    original = merge_module._merge_lora_blocks
    monkeypatch.setattr(merge_module, "_merge_lora_blocks", lambda *a: while_merging.append(torch.get_num_threads()) or original(*a))
    out = tmp_path / "merged"
    assert main(merge_args(tiny_model_dir, [first, second], out, "--dtype", "float32", "--verify")) == 0
    assert while_merging and set(while_merging) == {threads - 1} and torch.get_num_threads() == threads

    expected = {name: tensor.float() for name, tensor in weights(tiny_model_dir).items()}
    edited, transposed = set(), False
    for adapter in (first, second):
        for edit in read_adapter(adapter).edits:
            assert edit.kind == "lora"
            expected[edit.target] = edit.apply(expected[edit.target])
            edited.add(edit.target)
            transposed = transposed or edit.transpose
    merged = weights(out)
    assert transposed and "model.embed_tokens.weight" in edited and all(expected[n].shape[0] > 9 and expected[n].shape[0] % 9 for n in edited)
    assert all(torch.allclose(merged[n], expected[n], atol=1e-6, rtol=0) for n in expected)

    path = second / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.lora_B.weight"))
    tensors[key][20, 0] = float("nan")  # row 20: the third block of 9
    save_file(tensors, str(path))
    _refused(capsys, merge_args(tiny_model_dir, [first, second], tmp_path / "nan"), tmp_path / "nan", str(second), "up_proj", "NaN", after_progress=True)
    assert torch.get_num_threads() == threads


def test_streamed_shards_are_read_ahead_and_let_go_of_once_read(tiny_model_dir, tmp_path, monkeypatch):
    """Checkpoint.iter_tensors(stream=True) asks the kernel to read each shard ahead and, once its
    last tensor has been handed out, to drop it from the page cache; the tensors are the same."""
    import os
    import threading

    from peft import LoraConfig

    from zhllama.merge.checkpoint import Checkpoint

    adapter = make_adapter(tiny_model_dir, [], LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", seed=22)
    sharded = tmp_path / "sharded"
    assert main(merge_args(tiny_model_dir, [adapter], sharded, "--max-shard-size", "60KB")) == 0
    checkpoint = Checkpoint(sharded)
    assert len(checkpoint.shards) > 2
    events = []
    advise = os.posix_fadvise

    def recording(fd, offset, length, advice):
        events.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, advice))
        return advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", recording)
    streamed = []
    for name, tensor in checkpoint.iter_tensors(stream=True):
        events.append((checkpoint.shard_of[name].name, "tensor"))
        streamed.append((name, tensor.clone()))
    plain = list(checkpoint.iter_tensors())
    for thread in threading.enumerate():
        if thread.name == "read-ahead":  # the kernel is asked to read ahead from a thread
            thread.join()
    assert [n for n, _ in streamed] == [n for n, _ in plain] and all(torch.equal(a, b) for (_, a), (_, b) in zip(streamed, plain))
    handed_out = [name for name, kind in events if kind == "tensor"]
    for shard in checkpoint.shards:
        assert events.count((shard.name, os.POSIX_FADV_WILLNEED)) == 1 and events.count((shard.name, os.POSIX_FADV_DONTNEED)) == 1
        dropped = events.index((shard.name, os.POSIX_FADV_DONTNEED))
        before = [name for name, kind in events[:dropped] if kind == "tensor"]
        # let go of after its last tensor, before the next shard's first
        assert before == handed_out[: len(before)] and before[-1] == shard.name and shard.name not in handed_out[len(before):]


def test_bin_input_gives_the_same_checkpoint(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    adapter = make_adapter(tiny_model_dir, [], LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), tmp_path / "a", seed=12)
    as_bin = tmp_path / "bin_base"
    as_bin.mkdir()
    torch.save(weights(tiny_model_dir), as_bin / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer.model"):
        shutil.copy2(tiny_model_dir / name, as_bin / name)
    assert main(merge_args(tiny_model_dir, [adapter], tmp_path / "a_out", "--dtype", "float32")) == 0
    assert main(merge_args(as_bin, [adapter], tmp_path / "b_out", "--dtype", "float32", "--allow-base-mismatch")) == 0
    single, from_bin = weights(tmp_path / "a_out"), weights(tmp_path / "b_out")
    assert single.keys() == from_bin.keys() and all(torch.equal(single[k], from_bin[k]) for k in single)


def test_tied_model_with_diverging_output_rows_is_refused(tiny_tied_model_dir, tmp_path, capsys):
    from peft import TrainableTokensConfig

    # targeting both modules of a tied model makes peft train lm_head's rows apart from embed_tokens'
    config = TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=[990, 995])
    adapter = make_adapter(tiny_tied_model_dir, [], config, tmp_path / "a", seed=14)
    out = tmp_path / "merged"
    _refused(capsys, merge_args(tiny_tied_model_dir, [adapter], out), out, "cannot stay tied", "embed_tokens only")


def test_background_shard_writer_writes_the_same_bytes_and_reports_a_failed_write(tmp_path, monkeypatch):
    """merge hashes and writes in a worker thread: the file and its hash are those of the plain
    writer, ``wait`` returns once a tensor is on the file, and a write that fails in the worker
    fails the merge (here at ``close``) rather than vanishing with the thread."""
    from zhllama.merge.checkpoint import ShardWriter, TensorInfo, plan_shards, read_range

    tensors = {f"t{i}": torch.randn(64 + i, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    [shard] = plan_shards([TensorInfo(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], 10**9)
    monkeypatch.setattr(ShardWriter, "MAX_IN_FLIGHT", 20_000)  # a few tensors queued at most
    digests = {}
    for background in (False, True):
        writer = ShardWriter(tmp_path / f"{background}.safetensors", shard, background=background)
        for name, tensor in tensors.items():
            writer.write(name, tensor)
            writer.wait(name)
            assert torch.equal(read_range(writer.ranges[name], shard.tensors[list(tensors).index(name)]), tensor)
        digests[background] = writer.close()
    assert digests[True] == digests[False] == file_sha256(tmp_path / "True.safetensors")
    assert (tmp_path / "True.safetensors").read_bytes() == (tmp_path / "False.safetensors").read_bytes()

    writer = ShardWriter(tmp_path / "full.safetensors", shard, background=True)  # its header is written at once

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ShardWriter, "_write_now", disk_full)
    with pytest.raises(OSError, match="No space"):  # at the next write or at close, whichever comes first
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.close()
