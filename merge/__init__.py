"""Baking an adapter chain into one checkpoint, shard by shard, and exporting it (GGUF)."""

from zhllama.merge.gguf_export import export_gguf
from zhllama.merge.merge import MergeOptions, MergeResult, merge_chain

__all__ = ["MergeOptions", "MergeResult", "merge_chain", "export_gguf"]
