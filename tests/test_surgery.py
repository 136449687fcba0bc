"""zhllama extend writes its checkpoint shard by shard (pretrain/surgery.py): the base's sharding
kept (or --max-shard-size), every tensor but the vocabulary matrices copied bit for bit, .bin
converted to safetensors; broken checkpoints refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zhllama.cli import main
from zhllama.merge.checkpoint import Checkpoint
from zhllama.outdir import copy_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
SIDE_FILES = ["config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def shard_contents(directory: Path) -> dict[str, list[str]]:
    """shard file -> tensor names, from the files themselves."""
    contents = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            contents[path.name] = sorted(fh.keys())
    return contents


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def reshard(source: Path, out: Path, groups: int, fmt: str = "safetensors") -> Path:
    """``source``'s tensors split into ``groups`` shards, as safetensors or as pickled .bin files."""
    out.mkdir()
    copy_files(SIDE_FILES, source, out)
    tensors = dict(Checkpoint(source).iter_tensors())
    names = list(tensors)
    size = -(-len(names) // groups)
    weight_map = {}
    for i in range(groups):
        part = {n: tensors[n] for n in names[i * size : (i + 1) * size]}
        stem = "model" if fmt == "safetensors" else "pytorch_model"
        filename = f"{stem}-{i + 1:05d}-of-{groups:05d}.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        if fmt == "safetensors":
            save_file(part, str(out / filename), metadata={"format": "pt"})
        else:
            torch.save(part, out / filename)
        weight_map.update(dict.fromkeys(part, filename))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def extend(model_dir: Path, tokenizer_dir: Path, out: Path, *extra: str) -> int:
    return main(["extend", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--head-init", "mean", *extra])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_model_dir) -> Path:
    return reshard(tiny_model_dir, tmp_path_factory.mktemp("sharded") / "base", 3)


def test_extend_keeps_the_base_sharding_and_copies_other_tensors_bit_for_bit(sharded, merged_tokenizer_dir, tmp_path):
    out = tmp_path / "extended"
    assert extend(sharded, merged_tokenizer_dir, out) == 0
    assert shard_contents(out) == shard_contents(sharded)  # same files, same tensors in each
    base, extended = dict(Checkpoint(sharded).iter_tensors()), dict(Checkpoint(out).iter_tensors())
    assert set(base) == set(extended)
    rows = extended[VOCAB[0]].shape[0]
    assert rows > base[VOCAB[0]].shape[0]
    for name, tensor in base.items():
        kept = extended[name][: tensor.shape[0]] if name in VOCAB else extended[name]
        assert raw_bytes(kept) == raw_bytes(tensor), name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(extended) and set(index.values()) == set(shard_contents(out))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == rows


def data_section(path: Path, name: str) -> bytes:
    """The bytes tensor ``name`` occupies in the safetensors file ``path``, read from the file itself."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    return raw[8 + length + begin : 8 + length + end]


def extended_bytes_are_the_base_bytes(base: Path, out: Path) -> None:
    """Every base tensor's bytes in the base's files are in the extended files (the vocabulary
    matrices' as their first rows)."""
    where = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    now = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name, shard in where.items():
        before, after = data_section(base / shard, name), data_section(out / now[name], name)
        assert (after[: len(before)] if name in VOCAB else after) == before, name


@pytest.mark.parametrize("unsupported", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_unchanged_tensors_are_the_base_bytes_by_every_copy_method(unsupported, sharded, merged_tokenizer_dir, tmp_path, monkeypatch):
    """The byte ranges are copied in the kernel where it can (copy_file_range, sendfile) and through
    a buffer where it cannot; every way gives the base's bytes."""
    import errno

    def refuse(*args):
        raise OSError(errno.EXDEV if args else errno.ENOSYS, "not supported here")

    for method in unsupported:
        monkeypatch.setattr(os, method, refuse)
    out = tmp_path / "extended"
    assert extend(sharded, merged_tokenizer_dir, out) == 0
    extended_bytes_are_the_base_bytes(sharded, out)


def test_bin_base_becomes_the_same_safetensors_checkpoint(sharded, merged_tokenizer_dir, tmp_path):
    from_bin = tmp_path / "from_bin"
    assert extend(reshard(sharded, tmp_path / "bin", 2, fmt="bin"), merged_tokenizer_dir, from_bin) == 0
    from_safetensors = tmp_path / "from_safetensors"
    assert extend(reshard(sharded, tmp_path / "st", 2), merged_tokenizer_dir, from_safetensors) == 0
    assert not list(from_bin.glob("*.bin")) and list(shard_contents(from_bin)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    a, b = dict(Checkpoint(from_bin).iter_tensors()), dict(Checkpoint(from_safetensors).iter_tensors())
    assert set(a) == set(b) and all(raw_bytes(a[n]) == raw_bytes(b[n]) for n in a)


def test_max_shard_size_replans_the_shards(sharded, merged_tokenizer_dir, tmp_path):
    out = tmp_path / "extended"
    assert extend(sharded, merged_tokenizer_dir, out, "--max-shard-size", "100KB") == 0
    shards = list(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    # a shard holds more than 100 kB only when it is one tensor larger than that
    for path in shards:
        assert path.stat().st_size <= 100_000 + 4096 or len(shard_contents(out)[path.name]) == 1


def _wrong_shape(model_dir: Path) -> None:
    shard = sorted(model_dir.glob("*.safetensors"))[1]
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name] = tensors[name][:-2]
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _phantom_tensor(model_dir: Path) -> None:
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.mlp.extra_proj.weight"] = sorted(index["weight_map"].values())[0]
    index_file.write_text(json.dumps(index))


BREAKAGES = {
    "missing shard": (lambda d: sorted(d.glob("*.safetensors"))[1].unlink(), "missing"),
    "truncated shard": (lambda d: os.truncate(sorted(d.glob("*.safetensors"))[2], sorted(d.glob("*.safetensors"))[2].stat().st_size - 64), "cannot read"),
    "wrong shape": (_wrong_shape, "implies"),
    "tensor not in its shard": (_phantom_tensor, "no shard holds"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoint_is_refused_in_one_line_with_nothing_written(breakage, sharded, merged_tokenizer_dir, tmp_path, capsys):
    from merge_fixtures import make_adapter
    from peft import LoraConfig

    adapter = make_adapter(sharded, [], LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "adapter", seed=5)
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    breaks, words = BREAKAGES[breakage]
    breaks(broken)
    commands = {
        "extend": (["extend", "--model", str(broken), "--tokenizer", str(merged_tokenizer_dir), "--head-init", "mean"], tmp_path / "ext"),
        "merge": (["merge", "--model", str(broken), "--adapter", str(adapter), "--allow-base-mismatch", "--verify"], tmp_path / "merged"),
        "export": (["export", "gguf", "--model", str(broken)], tmp_path / "m.gguf"),
    }
    for name, (argv, out) in commands.items():
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 1, name
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("zhllama: error:") and words in error[0], (name, error)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), name
