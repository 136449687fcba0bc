"""Export a merged LLaMA checkpoint to GGUF for llama.cpp, with its SentencePiece vocabulary.

Follows what llama.cpp's ``convert_hf_to_gguf.py`` does for LLaMA models:

- architecture metadata ``llama.*`` from config.json (context length, sizes, head counts with
  GQA, rope base, RMS-norm epsilon, vocabulary size);
- the vocabulary from ``tokenizer.model``: every piece with its score and type (normal,
  unknown, control, unused, byte), padded with ``[PADn]`` unused tokens up to the embedding's
  row count; special ids, add-BOS/EOS and the chat template via ``gguf.SpecialVocab``;
- tensor names from ``gguf``'s own HF→GGUF map (``token_embd``, ``blk.N.attn_q``, ...);
- q and k projections permuted from Hugging Face's rotary layout (rotate-half) back to the
  interleaved layout llama.cpp's rope expects (:func:`permute_for_rope`);
- 1-D tensors (norms) in F32; matrices in the checkpoint's dtype (``outtype="auto"``) or in
  the chosen type: F32, F16, BF16, or one of llama.cpp's block-quantised types that the ``gguf``
  package can write (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0); a matrix whose rows do not split into the
  type's blocks is written as F16 instead (as llama.cpp's converter does).

Tensors are streamed: the header is written from the shapes alone, then each tensor is read,
converted and written in turn.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from zhllama.chain import check_tokenizer_fits
from zhllama.errors import ZhllamaError
from zhllama.merge.checkpoint import Checkpoint

SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
# --outtype -> GGML tensor type name for the matrices ("auto": the checkpoint's dtype)
OUTTYPES = {"auto": None, "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q5_1": "Q5_1", "q5_0": "Q5_0", "q4_1": "Q4_1", "q4_0": "Q4_0"}


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's [first halves | second halves] to interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_for_rope` (used by tests to compare with the checkpoint)."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    kind = params.get("rope_type", "default")
    if kind != "default" or config.get("rope_scaling"):
        raise ZhllamaError(f"GGUF export: rope scaling '{kind}' is not supported yet; export with llama.cpp's convert_hf_to_gguf.py")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _vocabulary(tokenizer_model: Path, rows: int):
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    check_tokenizer_fits(sp.get_piece_size(), rows, tokenizer=tokenizer_model, model=tokenizer_model.parent, fix="export the checkpoint this tokenizer was merged for")
    tokens = [f"[PAD{i}]".encode() for i in range(rows)]
    scores = [-1000.0] * rows
    types = [gguf.TokenType.UNUSED] * rows
    for i in range(sp.get_piece_size()):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        types[i] = (
            gguf.TokenType.UNKNOWN if sp.is_unknown(i)
            else gguf.TokenType.CONTROL if sp.is_control(i)
            else gguf.TokenType.UNUSED if sp.is_unused(i)
            else gguf.TokenType.BYTE if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer_model.read_bytes())
    return tokens, scores, types, proto.normalizer_spec.add_dummy_prefix


def matrix_type(outtype: str, matrix_dtype: torch.dtype):
    """The GGML type of the matrices for ``outtype``."""
    import gguf

    if OUTTYPES[outtype] is not None:
        return gguf.GGMLQuantizationType[OUTTYPES[outtype]]
    return {torch.bfloat16: gguf.GGMLQuantizationType.BF16, torch.float16: gguf.GGMLQuantizationType.F16}.get(
        matrix_dtype, gguf.GGMLQuantizationType.F32
    )


def _storage(shape: tuple[int, ...], matrices):
    """The GGML type a tensor is stored as: norms stay F32 (as llama.cpp's converter keeps
    them), matrices take ``matrices`` if their rows split into its blocks, else F16."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[matrices][0]
    return matrices if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _encoded(tensor: torch.Tensor, ggml_type) -> np.ndarray:
    """The tensor's bytes as GGUF stores them for ``ggml_type``."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if ggml_type == kinds.BF16:  # numpy has no bfloat16: write the raw 16-bit patterns
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if ggml_type in (kinds.F32, kinds.F16):
        return tensor.to(torch.float32 if ggml_type == kinds.F32 else torch.float16).contiguous().numpy()
    return gguf.quants.quantize(tensor.float().contiguous().numpy(), ggml_type)


def export_gguf(
    model_dir: str | Path, gguf_file: str | Path, *, tokenizer_dir: str | Path | None = None, name: str | None = None, outtype: str = "auto"
) -> Path:
    """Write ``gguf_file`` from a (merged) LLaMA checkpoint directory and its ``tokenizer.model``.

    ``name`` (``general.name``) defaults to the directory's name; ``outtype`` is one of
    :data:`OUTTYPES` (the matrices' type).
    """
    if outtype not in OUTTYPES:
        raise ZhllamaError(f"--outtype {outtype}: not a type the GGUF export writes; choose one of {', '.join(OUTTYPES)}")
    # gguf logs every key it writes, and warns about LLaMA's pair template ("<s> $A <s> $B") it has no use for
    gguf_logger = logging.getLogger("gguf")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    try:
        return _export(Path(model_dir), Path(gguf_file), tokenizer_dir, name, outtype)
    finally:
        gguf_logger.setLevel(level)


def _export(model_dir: Path, gguf_file: Path, tokenizer_dir: str | Path | None, name: str | None, outtype: str) -> Path:
    import gguf

    tokenizer_model = Path(tokenizer_dir or model_dir) / "tokenizer.model"
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise ZhllamaError(f"GGUF export: {model_dir} is a '{config.get('model_type')}' model; only LLaMA-architecture models are supported")
    if not tokenizer_model.is_file():
        raise ZhllamaError(f"GGUF export: no {tokenizer_model}; llama.cpp needs the SentencePiece model")
    checkpoint = Checkpoint(model_dir)
    checkpoint.check_shapes(config)
    if "model.embed_tokens.weight" not in checkpoint.tensors:
        raise ZhllamaError(f"GGUF export: {model_dir} has no model.embed_tokens.weight; is it a LLaMA checkpoint?")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    rows = checkpoint.tensors["model.embed_tokens.weight"].shape[0]
    matrices = matrix_type(outtype, checkpoint.tensors["model.embed_tokens.weight"].dtype)
    file_type = gguf.LlamaFileType.ALL_F32 if matrices == gguf.GGMLQuantizationType.F32 else gguf.LlamaFileType[f"MOSTLY_{matrices.name}"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    writer = gguf.GGUFWriter(str(gguf_file), "llama")
    writer.add_name(name or model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(rows)
    writer.add_file_type(file_type)
    tokens, scores, types, add_space_prefix = _vocabulary(tokenizer_model, rows)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)
    gguf.SpecialVocab(tokenizer_model.parent, n_vocab=rows).add_to_gguf(writer, quiet=True)

    names, types = {}, {}
    for name, info in checkpoint.tensors.items():
        if name.endswith(SKIPPED_SUFFIXES):
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ZhllamaError(f"GGUF export: {model_dir} has tensor {name}, which has no llama.cpp name")
        names[name] = gguf_name
        types[name] = _storage(info.shape, matrices)
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(info.shape, types[name])))
        writer.add_tensor_info(gguf_name, info.shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, tensor in checkpoint.iter_tensors(stream=True):
        if name not in names:
            continue
        if name.endswith("self_attn.q_proj.weight"):
            tensor = permute_for_rope(tensor, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            tensor = permute_for_rope(tensor, kv_heads)
        writer.write_tensor_data(_encoded(tensor, types[name]))
    writer.close()
    return gguf_file
