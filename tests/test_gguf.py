"""GGUF export: read back with gguf's own reader, the file holds the merged checkpoint exactly,
in llama.cpp's layout, with the SentencePiece vocabulary and LLaMA metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from merge_fixtures import chain_adapters, make_adapter
from test_merge import merge_args, weights
from zhllama.cli import main
from zhllama.merge.gguf_export import permute_for_rope, unpermute_for_rope


def field(reader, key):
    return reader.fields[key].contents()


def gguf_tensors(reader) -> dict[str, torch.Tensor]:
    import gguf

    tensors = {}
    for t in reader.tensors:
        data = np.ascontiguousarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            tensor = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(data.copy())
        tensors[t.name] = tensor.reshape(tuple(int(n) for n in reversed(t.shape)))
    return tensors


def check_gguf(gguf_file: Path, merged_dir: Path) -> dict:
    """Compare a GGUF file with the merged checkpoint it was made from; return the metadata."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_file))
    config = json.loads((merged_dir / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    assert field(reader, "general.architecture") == "llama"
    expected = {
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.vocab_size": config["vocab_size"],
        "llama.rope.dimension_count": config.get("head_dim") or config["hidden_size"] // heads,
    }
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    sp = spm.SentencePieceProcessor(model_file=str(merged_dir / "tokenizer.model"))
    tokens, scores, types = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == config["vocab_size"]
    assert tokens[: sp.get_piece_size()] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.allclose(scores[: sp.get_piece_size()], [sp.get_score(i) for i in range(sp.get_piece_size())])
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert field(reader, "tokenizer.ggml.bos_token_id") == sp.bos_id()
    assert field(reader, "tokenizer.ggml.eos_token_id") == sp.eos_id()

    merged = weights(merged_dir)
    stored = gguf_tensors(reader)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(config["num_hidden_layers"]):
        for hf, ours in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    assert set(stored) == {names[k] for k in merged}
    for name, tensor in merged.items():
        value = stored[names[name]]
        if name.endswith("q_proj.weight"):
            value = unpermute_for_rope(value, heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_for_rope(value, kv_heads)
        if tensor.ndim == 1:
            assert value.dtype == torch.float32  # norms stay F32, as llama.cpp's converter keeps them
        else:
            assert value.dtype == tensor.dtype
        assert torch.equal(value.to(tensor.dtype), tensor), name
    return reader


def test_rope_permutation_is_llama_cpp_s_and_invertible():
    heads, head_dim = 2, 4
    weight = torch.arange(heads * head_dim, dtype=torch.float32).repeat_interleave(3).reshape(heads * head_dim, 3)
    permuted = permute_for_rope(weight, heads)
    # per head, HF's rotate-half rows [0 1 | 2 3] become llama.cpp's interleaved pairs [0 2 1 3]
    assert permuted[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(unpermute_for_rope(permuted, heads), weight)


@pytest.mark.parametrize("tied, dtype", [(False, "float16"), (True, "bfloat16")])
def test_merge_exports_gguf(tied, dtype, tmp_path, tiny_model_dir, tiny_tied_model_dir):
    torch.set_num_threads(1)
    model_dir = tiny_tied_model_dir if tied else tiny_model_dir
    adapters = chain_adapters(model_dir, tmp_path, tied=tied, new_rows=list(range(950, 1000)))
    out, gguf_file = tmp_path / "merged", tmp_path / "model.gguf"
    assert main(merge_args(model_dir, adapters, out, "--dtype", dtype, "--gguf", str(gguf_file))) == 0
    reader = check_gguf(gguf_file, out)
    assert ("output.weight" in {t.name for t in reader.tensors}) is (not tied)
    assert json.loads((out / "zhllama.json").read_text())["gguf"] == str(gguf_file.resolve())
    assert not list(tmp_path.glob(".model.gguf.tmp-*"))


def test_export_gguf_command_writes_once_and_refuses_existing_file(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(target)]) == 0
    check_gguf(target, tiny_model_dir)
    assert not list(tmp_path.glob(".m.gguf.tmp-*"))
    written = target.stat().st_mtime_ns
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(target)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "exists" in error[0] and "--overwrite" in error[0]
    assert target.stat().st_mtime_ns == written


@pytest.mark.real_assets
def test_stories260k_merge_verify_and_gguf(assets, tmp_path):
    """A real pretrained LLaMA (tied, GQA 8/4 heads, 512 pieces, tokenizer.model only)."""
    from peft import LoraConfig

    torch.set_num_threads(1)
    model_dir = assets / "models" / "stories260K"
    adapter = make_adapter(
        model_dir,
        [],
        LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                   trainable_token_indices={"embed_tokens": [300, 400, 511]}),
        tmp_path / "adapter",
        seed=11,
    )
    out, gguf_file = tmp_path / "merged", tmp_path / "stories.gguf"
    assert main(merge_args(model_dir, [adapter], out, "--dtype", "float32", "--verify", "--gguf", str(gguf_file))) == 0
    assert "lm_head.weight" not in weights(out)
    reader = check_gguf(gguf_file, out)
    assert field(reader, "llama.attention.head_count") == 8 and field(reader, "llama.attention.head_count_kv") == 4
    assert field(reader, "llama.vocab_size") == 512
    assert "output.weight" not in {t.name for t in reader.tensors}


def test_gguf_inside_the_output_directory_and_failures_leave_nothing(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig

    adapter = make_adapter(tiny_model_dir, [], LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", seed=13)
    out = tmp_path / "merged"
    assert main(merge_args(tiny_model_dir, [adapter], out, "--dtype", "float16", "--gguf", str(out / "model.gguf"))) == 0
    check_gguf(out / "model.gguf", out)

    elsewhere = tmp_path / "m.gguf"
    capsys.readouterr()
    # a merge whose GGUF export fails (no tokenizer.model anywhere in the chain) leaves neither
    # the directory nor the file behind
    (adapter / "tokenizer.model").unlink()
    no_sp = tmp_path / "no_sp_base"
    no_sp.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (no_sp / name).write_bytes((tiny_model_dir / name).read_bytes())
    out2 = tmp_path / "merged2"
    assert main(merge_args(no_sp, [adapter], out2, "--gguf", str(elsewhere), "--allow-base-mismatch")) == 1
    assert "tokenizer.model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out2.exists() and not elsewhere.exists() and not list(tmp_path.glob(".m.gguf.tmp-*"))


@pytest.mark.parametrize("outtype, matrix_type, max_error", [("f32", "F32", 0.0), ("f16", "F16", 1e-3), ("q8_0", "Q8_0", 0.01), ("q4_0", "Q4_0", 0.2)])
def test_export_outtype_writes_that_type_and_reads_back(outtype, matrix_type, max_error, tiny_model_dir, tmp_path):
    """Matrices in the chosen type (dequantised by gguf's own reader, close to the checkpoint's
    values), norms in F32; the result reports the file's size."""
    import gguf

    from zhllama.merge.cli import ExportGgufOptions, run_export_gguf

    result = run_export_gguf(ExportGgufOptions(model=tiny_model_dir, out=tmp_path / f"m-{outtype}.gguf", outtype=outtype))
    assert result.bytes == result.out.stat().st_size and f"{result.bytes / 2**30:.2f} GiB" in result.summary()
    reader = gguf.GGUFReader(str(result.out))
    merged = weights(tiny_model_dir)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight", "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    for t in reader.tensors:
        # gguf lists the row length first; rows that do not split into the type's blocks fall back to F16
        splits = int(t.shape[0]) % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[matrix_type]][0] == 0
        expected = "F32" if len(t.shape) == 1 else matrix_type if splits else "F16"
        assert t.tensor_type.name == expected, t.name
        if t.name in names:
            values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            reference = merged[names[t.name]].float()
            assert values.shape == reference.shape
            assert (values - reference).abs().max().item() <= max_error * max(1.0, reference.abs().max().item()), t.name
    if outtype == "q8_0":  # about 8.5 bits a weight instead of 32
        assert result.bytes < 0.4 * run_export_gguf(ExportGgufOptions(model=tiny_model_dir, out=tmp_path / "f32.gguf", outtype="f32")).bytes


def test_unsupported_outtype_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    target = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(tiny_model_dir), "--out", str(target), "--outtype", "q3_k"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "q3_k" in error[0] and "q8_0" in error[0]
    assert not list(tmp_path.iterdir())


def test_merge_writes_the_gguf_outtype_asked_for(tiny_model_dir, tmp_path):
    import gguf
    from peft import LoraConfig

    adapter = make_adapter(tiny_model_dir, [], LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a", seed=17)
    out, gguf_file = tmp_path / "merged", tmp_path / "m.gguf"
    assert main(merge_args(tiny_model_dir, [adapter], out, "--gguf", str(gguf_file), "--gguf-outtype", "q8_0")) == 0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0 and types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
