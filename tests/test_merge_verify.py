"""merge --verify, layer by layer: exact for a float32 merge of the whole chain (rows, LoRA,
rsLoRA, rank patterns, embedding LoRA, modules_to_save), and it catches a merge that is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from merge_fixtures import chain_adapters, make_adapter
from test_merge import merge_args
from zhllama.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW_ROWS = list(range(900, 1000))


def figures(out) -> dict:
    return json.loads((out / "zhllama.json").read_text())["figures"]


@pytest.fixture(scope="module")
def untied_chain(tmp_path_factory, tiny_model_dir):
    return chain_adapters(tiny_model_dir, tmp_path_factory.mktemp("verify_chain"), tied=False, new_rows=NEW_ROWS)


def test_float32_merge_verifies_exactly(tiny_model_dir, untied_chain, tmp_path):
    out = tmp_path / "merged"
    assert main(merge_args(tiny_model_dir, untied_chain, out, "--dtype", "float32", "--verify")) == 0
    assert figures(out)["max_logit_diff"] <= 1e-5


def test_tied_chain_and_embedding_lora_verify(tiny_tied_model_dir, tiny_model_dir, tmp_path):
    from peft import LoraConfig

    tied = chain_adapters(tiny_tied_model_dir, tmp_path / "tied", tied=True, new_rows=NEW_ROWS)
    assert main(merge_args(tiny_tied_model_dir, tied, tmp_path / "m1", "--dtype", "float32", "--verify")) == 0
    assert figures(tmp_path / "m1")["max_logit_diff"] <= 1e-5
    full = make_adapter(tiny_model_dir, [], LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), tmp_path / "full", seed=4)
    embed_lora = make_adapter(tiny_model_dir, [full], LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"]), tmp_path / "emb", seed=5)
    assert main(merge_args(tiny_model_dir, [full, embed_lora], tmp_path / "m2", "--dtype", "float32", "--verify")) == 0
    assert figures(tmp_path / "m2")["max_logit_diff"] <= 1e-5


@pytest.mark.parametrize("wrong", ["dropped LoRA", "wrong scale"])
def test_verify_catches_a_wrong_merge(wrong, tiny_model_dir, untied_chain, tmp_path, monkeypatch, capsys):
    """verify does not share merge's arithmetic: break merge's, and verify refuses the result."""
    import zhllama.merge.merge as merge_module

    original = merge_module._merge_tensor

    def broken(name, tensor, adapters, dtype, **kwargs):  # kwargs: the base's fp32 copy for verify's chain
        if name != "model.layers.1.mlp.down_proj.weight":
            return original(name, tensor, adapters, dtype, **kwargs)
        if wrong == "dropped LoRA":
            return tensor.to(dtype)
        return (2 * original(name, tensor, adapters, torch.float32) - tensor.float()).to(dtype)

    monkeypatch.setattr(merge_module, "_merge_tensor", broken)
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(merge_args(tiny_model_dir, untied_chain, out, "--dtype", "float32", "--verify")) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("zhllama: error: --verify:") and "differ" in error
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*"))


def test_verify_reads_the_merged_files_as_written(tiny_model_dir, untied_chain, tmp_path, monkeypatch, capsys):
    """The merged pass runs on the bytes in the written shards, not on the tensors merge held:
    a shard writer that writes other bytes than it was given is caught."""
    from zhllama.merge import checkpoint

    original = checkpoint.ShardWriter.write

    def writes_zeros(self, name, tensor):
        original(self, name, torch.zeros_like(tensor) if name == "model.layers.0.self_attn.v_proj.weight" else tensor)

    monkeypatch.setattr(checkpoint.ShardWriter, "write", writes_zeros)
    capsys.readouterr()
    assert main(merge_args(tiny_model_dir, untied_chain, tmp_path / "merged", "--dtype", "float32", "--verify")) == 1
    assert "differ" in capsys.readouterr().err.strip().splitlines()[-1]


def test_verify_reads_neither_checkpoint_again(tiny_model_dir, untied_chain, tmp_path, monkeypatch):
    """--verify runs while merge streams the base: no decoder-layer tensor is read a second time,
    from the base or from the merged checkpoint."""
    from zhllama.merge.checkpoint import Checkpoint

    reads, streams = [], []
    original_read, original_iter = Checkpoint.read, Checkpoint.iter_tensors
    monkeypatch.setattr(Checkpoint, "read", lambda self, names: reads.extend(names) or original_read(self, names))
    monkeypatch.setattr(Checkpoint, "iter_tensors", lambda self, **kw: streams.append(self.model_dir) or original_iter(self, **kw))
    assert main(merge_args(tiny_model_dir, untied_chain, tmp_path / "merged", "--dtype", "float32", "--verify")) == 0
    assert figures(tmp_path / "merged")["max_logit_diff"] <= 1e-5
    assert streams == [tiny_model_dir] and not [n for n in reads if ".layers." in n]


def test_merged_shards_leave_the_page_cache_once_verify_has_read_them(tiny_model_dir, untied_chain, tmp_path, monkeypatch):
    """merge drops each merged shard it has written from the page cache, but with --verify only
    once the merged pass has read back every layer in it (the final norm and head excepted)."""
    from zhllama.merge import checkpoint, merge as merge_module

    events = []
    original_read = checkpoint.read_range
    monkeypatch.setattr(checkpoint, "read_range", lambda source, info, *a: events.append(("read", source.path.name, info.name)) or original_read(source, info, *a))
    monkeypatch.setattr("zhllama.merge.verify.read_range", checkpoint.read_range)
    monkeypatch.setattr(merge_module, "drop_from_page_cache", lambda path: events.append(("drop", path.name, None)))
    out = tmp_path / "merged"
    assert main(merge_args(tiny_model_dir, untied_chain, out, "--dtype", "float32", "--max-shard-size", "60KB", "--verify")) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    dropped = {name for kind, name, _ in events if kind == "drop"}
    assert len(shards) > 2 and set(shards[:-1]) <= dropped <= set(shards)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    read_back = {weight_map[n] for n in weight_map if ".layers." in n or n == "model.embed_tokens.weight"}
    assert read_back & dropped
    for shard in dropped:
        first_drop = events.index(("drop", shard, None))
        assert (shard in read_back) == any(e[:2] == ("read", shard) for e in events[:first_drop])
        assert not [e for e in events[first_drop:] if e[:2] == ("read", shard)]


def test_verify_with_layers_out_of_order_in_the_shards(tiny_model_dir, tmp_path):
    """Shards that hold a later decoder layer before an earlier one (as name-sorted shards do):
    the layers wait until the one before them has run."""
    from peft import LoraConfig
    from test_surgery import SIDE_FILES
    from safetensors.torch import save_file

    from zhllama.merge.checkpoint import Checkpoint
    from zhllama.outdir import copy_files

    base = tmp_path / "base"
    base.mkdir()
    copy_files(SIDE_FILES, tiny_model_dir, base)
    tensors = dict(Checkpoint(tiny_model_dir).iter_tensors())
    first = {n: t for n, t in tensors.items() if not n.startswith("model.layers.0.")}
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": {n: t for n, t in tensors.items() if n not in first}}
    for filename, part in shards.items():
        save_file(part, str(base / filename), metadata={"format": "pt"})
    weight_map = {n: filename for filename, part in shards.items() for n in part}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    adapter = make_adapter(base, [], LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), tmp_path / "adapter", seed=6)
    assert main(merge_args(base, [adapter], tmp_path / "merged", "--dtype", "float32", "--verify")) == 0
    assert figures(tmp_path / "merged")["max_logit_diff"] <= 1e-5
