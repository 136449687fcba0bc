"""Reading a checkpoint one shard at a time, and writing safetensors shards one tensor at a time.

:class:`Checkpoint` lists the tensors of a Hugging Face model directory (single file or sharded,
safetensors or ``.bin``) from the file headers alone, then yields the tensors of one shard at a
time, so nothing ever holds the whole model.

:class:`ShardWriter` writes a safetensors file tensor by tensor. The safetensors package only
writes a whole dict of tensors at once (and serialises it to bytes first, so a shard would sit
in memory twice); since the header only needs names, dtypes and shapes, which we know before
merging, we write it first and then stream each tensor's bytes behind it. The result is an
ordinary safetensors file (the tests load it with ``safetensors`` and ``transformers``). A tensor
that is not changed can be given as a :class:`ByteRange` of its source safetensors file: its bytes
are then copied file to file inside the kernel, never decoded into a tensor.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from zhllama.errors import ZhllamaError

# LLaMA-architecture tensor names the stages that rewrite checkpoints rely on
EMBEDDING = "model.embed_tokens.weight"
OUTPUT_EMBEDDING = "lm_head.weight"
FINAL_NORM = "model.norm.weight"

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SAFETENSORS_TO_TORCH = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"2GB"`` → 2_000_000_000 (decimal units as transformers uses; ``GiB`` is binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a size like 2GB, 500MB or 1GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """The weight files of a model directory, read shard by shard."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.shards = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, Path] = {}
        for shard in self.shards:
            for info in self._read_header(shard):
                self.tensors[info.name] = info
                self.shard_of[info.name] = shard
        absent = [name for name in self.index if name not in self.tensors]
        if absent:
            raise ZhllamaError(
                f"{self.model_dir}: the shard index names {len(absent)} tensor(s) no shard holds (first: {absent[0]} in "
                f"{self.index[absent[0]]}); the checkpoint is incomplete, download it again"
            )

    def _shard_files(self) -> list[Path]:
        self.index: dict[str, str] = {}  # tensor name -> shard file, when there is an index
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = self.model_dir / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, ValueError, KeyError) as e:
                    raise ZhllamaError(f"{index}: unreadable shard index ({e})") from e
                self.index = dict(weight_map)
                files = [self.model_dir / name for name in dict.fromkeys(weight_map.values())]
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise ZhllamaError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
                return files
            if (self.model_dir / single).is_file():
                return [self.model_dir / single]
        raise ZhllamaError(f"{self.model_dir}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")

    def _read_header(self, shard: Path) -> list[TensorInfo]:
        from safetensors import SafetensorError

        try:
            if shard.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(shard), framework="pt") as fh:
                    return [
                        TensorInfo(k, tuple(fh.get_slice(k).get_shape()), _SAFETENSORS_TO_TORCH[fh.get_slice(k).get_dtype()])
                        for k in fh.keys()
                    ]
            state = self._load_bin(shard)
            return [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in state.items()]
        except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as e:
            raise ZhllamaError(
                f"{shard}: cannot read weights: {' '.join(str(e).split())[:200]}; the file is damaged or incomplete, copy or download it again"
            ) from e

    @staticmethod
    def _load_bin(shard: Path) -> dict[str, torch.Tensor]:
        # mmap: the tensors are read from disk as they are touched, not all at once
        return torch.load(str(shard), map_location="cpu", weights_only=True, mmap=True)

    def iter_shard(self, shard: Path, *, copy: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one shard, one at a time (each a fresh in-memory copy; with ``copy=False``
        a ``.bin`` shard's tensors are views of its memory map, for a caller that only reads them once)."""
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        else:
            state = self._load_bin(shard)
            for name in list(state):
                tensor = state.pop(name)
                yield name, tensor.clone() if copy else tensor
                del tensor

    def byte_ranges(self, shard: Path) -> dict[str, "ByteRange"]:
        """Where each tensor's bytes lie in a safetensors shard, from its header (in :meth:`iter_shard`'s order)."""
        try:
            with open(shard, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            size = shard.stat().st_size
            ranges = {}
            for name in [n for n, where in self.shard_of.items() if where == shard]:  # the order iter_shard yields
                begin, end = header[name]["data_offsets"]
                info = self.tensors[name]
                if end - begin != info.numel * info.dtype.itemsize or 8 + length + end > size:
                    raise ValueError(f"tensor {name}'s bytes {begin}..{end} do not fit its shape or the file")
                ranges[name] = ByteRange(shard, 8 + length + begin, end - begin)
            return ranges
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise ZhllamaError(f"{shard}: unreadable safetensors header ({e}); the file is damaged, copy or download it again") from e

    def iter_tensors(self, *, stream: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, shard by shard; with ``stream`` (a caller that reads the checkpoint once)
        the shards are read ahead and let go of as :func:`read_once` does."""
        for shard in read_once(self.shards) if stream else self.shards:
            yield from self.iter_shard(shard)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors (in-memory copies), opening each shard that holds one once."""
        wanted: dict[Path, list[str]] = {}
        for name in names:
            wanted.setdefault(self.shard_of[name], []).append(name)
        tensors = {}
        for shard, shard_names in wanted.items():
            if shard.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(shard), framework="pt") as fh:
                    tensors.update({name: fh.get_tensor(name) for name in shard_names})
            else:
                state = self._load_bin(shard)
                tensors.update({name: state[name].clone() for name in shard_names})
        return tensors

    def check_shapes(self, config: dict) -> None:
        """Refuse a tensor whose shape does not follow from config.json (a LLaMA-architecture model).

        The embedding and LM head may have any number of rows (extend adds some; a base's
        config.json is sometimes wrong about it), but not another width."""
        for info in self.tensors.values():
            expected = expected_shape(info.name, config)
            if expected is None:
                continue
            if info.name.endswith(("embed_tokens.weight", "lm_head.weight")) and len(info.shape) == 2:
                expected = (info.shape[0], expected[1])
            if info.shape != expected:
                raise ZhllamaError(
                    f"{self.shard_of[info.name]}: tensor {info.name} has shape {info.shape} but {self.model_dir / 'config.json'} "
                    f"implies {expected}; the shard belongs to another model or was written wrongly"
                )


def read_once(shards: list[Path]) -> Iterator[Path]:
    """``shards`` in turn, for a caller that reads each once before asking for the next.

    The kernel reads a shard into the page cache in the background from the moment the one
    before it is handed out, so the disk keeps reading while the caller computes and the caller
    finds the pages there; once the caller asks for the next shard, the last one's pages leave
    the cache, so a stream of many GB does not fill memory with pages nobody reads again. Both
    are hints: they change no byte read."""
    for index, shard in enumerate(shards):
        if index == 0:
            _advise(shard, "POSIX_FADV_WILLNEED", background=True)
        if index + 1 < len(shards):
            _advise(shards[index + 1], "POSIX_FADV_WILLNEED", background=True)
        yield shard
        drop_from_page_cache(shard)


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s pages from the page cache: at once those already on the
    disk; the others (written, not yet flushed) it starts writing, and a later call drops them.
    A stream that writes many GB then does not fill memory, where each new page would cost a
    reclaim."""
    _advise(path, "POSIX_FADV_DONTNEED")


def _advise(path: Path, advice: str, *, background: bool = False) -> None:
    """``posix_fadvise`` the whole of ``path``; in a thread with ``background`` (asking the kernel
    to read ahead blocks while it queues the reads)."""
    import threading

    def advise() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, getattr(os, advice))
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass  # only a hint: without it the pages are read on demand, or stay cached

    if background:
        threading.Thread(target=advise, name="read-ahead", daemon=True).start()
    else:
        advise()


def expected_shape(name: str, config: dict) -> tuple[int, ...] | None:
    """The shape a LLaMA tensor must have according to config.json (None for names it does not know)."""
    hidden, inner = config.get("hidden_size"), config.get("intermediate_size")
    heads = config.get("num_attention_heads")
    if not (hidden and inner and heads):
        return None
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    vocab = config.get("vocab_size") or 0
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, hidden)
    if name == "model.norm.weight":
        return (hidden,)
    layer = re.fullmatch(r"model\.layers\.\d+\.(.+)", name)
    return {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inner, hidden),
        "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
    }.get(layer.group(1)) if layer else None


@dataclass(frozen=True)
class PlannedShard:
    filename: str
    tensors: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel * t.dtype.itemsize for t in self.tensors)


def plan_shards(tensors: list[TensorInfo], max_shard_bytes: int) -> list[PlannedShard]:
    """Group tensors into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own), with
    huggingface_hub's planner and file names, from their headers alone (no tensor is read)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {info.name: info for info in tensors}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda info: info.numel * info.dtype.itemsize,
        get_storage_id=lambda info: None,  # header entries share no storage
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
    )
    return [PlannedShard(filename, tuple(by_name[name] for name in names)) for filename, names in split.filename_to_tensors.items()]


def write_index(out_dir: Path, shards: list[PlannedShard]) -> None:
    """``model.safetensors.index.json``, also for a single shard: ``save_pretrained`` omits it then,
    but tools that look for the index (and readers checking the output) find it either way, and
    loaders prefer ``model.safetensors`` when both exist."""
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes at ``offset`` of the file ``path``: a tensor's data, to be copied as it is."""

    path: Path
    offset: int
    length: int


def _copy_range(source: ByteRange, dst_fd: int) -> None:
    """Append ``source``'s bytes to ``dst_fd`` (at its position): in the kernel by copy_file_range
    (no user-space copy; a reflink where the file system shares blocks), else sendfile, else read/write."""
    with open(source.path, "rb", buffering=0) as src:
        offset, left = source.offset, source.length
        for method in ("copy_file_range", "sendfile", "readwrite"):
            try:
                while left:
                    if method == "copy_file_range":
                        n = os.copy_file_range(src.fileno(), dst_fd, min(left, 1 << 30), offset)
                    elif method == "sendfile":
                        n = os.sendfile(dst_fd, src.fileno(), offset, min(left, 1 << 30))
                    else:
                        n = _write_all(dst_fd, os.pread(src.fileno(), min(left, 64 << 20), offset))
                    if n == 0:
                        raise ZhllamaError(f"{source.path}: ends before byte {offset}; the file is truncated, copy or download it again")
                    offset, left = offset + n, left - n
                return
            except OSError as e:  # not supported here (old kernel, other file system): the next way
                if method == "readwrite" or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise


def _write_all(fd: int, data) -> int:
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        view = view[os.write(fd, view) :]
    return total


class ShardWriter:
    """Write one planned safetensors shard, tensor by tensor, in the planned order.

    With ``background=True`` the bytes are hashed and written by a worker thread (hashlib and
    ``os.write`` release the GIL on large buffers), so the caller computes the next tensor on the
    other core meanwhile; at most :data:`MAX_IN_FLIGHT` bytes wait, and :meth:`wait` blocks until
    a named tensor is on its file (for a reader of it). The written bytes are the same either way.
    """

    MAX_IN_FLIGHT = 256 << 20

    def __init__(self, path: Path, shard: PlannedShard, *, digest: bool = True, background: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        self.expected = list(shard.tensors)
        self.sha256 = hashlib.sha256() if digest else None
        self._pending: list = []  # (future, bytes) of queued writes, oldest first
        self._written: dict = {}  # tensor name -> the future of its last write
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for info in self.expected:
            end = offset + info.numel * info.dtype.itemsize
            header[info.name] = {"dtype": SAFETENSORS_DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
        start = 8 + len(raw)
        # where each tensor lies in the file, by the header (read back by merge --verify once written)
        self.ranges = {name: ByteRange(path, start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
                       for name, entry in header.items() if name != "__metadata__"}
        self.fh = open(path, "wb", buffering=0)  # unbuffered: byte ranges are copied at the file's own position
        try:
            self._write_now(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.fh.close()
            raise
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="shard-writer") if background else None

    def _write(self, data, name: str | None = None) -> None:
        self._submit(self._write_now, data, nbytes=len(memoryview(data).cast("B")), name=name)

    def _submit(self, work, *args, nbytes: int, name: str | None = None) -> None:
        """Run ``work(*args)`` now, or queue it for the worker (in order) when writing in the background."""
        if self._worker is None:
            work(*args)
            return
        # the queued buffer keeps its tensor alive until the worker is done with it
        future = self._worker.submit(work, *args)
        self._pending.append((future, nbytes))
        if name is not None:
            self._written[name] = future
        while len(self._pending) > 1 and sum(n for _, n in self._pending) > self.MAX_IN_FLIGHT:
            self._pending.pop(0)[0].result()
        waiting = []
        for queued, size in self._pending:
            if queued.done():
                queued.result()  # a failed write raises here, at the next tensor
            else:
                waiting.append((queued, size))
        self._pending = waiting

    def _write_now(self, data) -> None:
        if self.sha256 is not None:
            self.sha256.update(data)
        _write_all(self.fh.fileno(), data)

    def wait(self, name: str) -> None:
        """Block until tensor ``name``'s bytes are written (the worker writes in order)."""
        future = self._written.pop(name, None)
        if future is not None:
            future.result()

    def _drain(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0)[0].result()
        finally:
            self._written.clear()
            if self._worker is not None:
                self._worker.shutdown()

    def abort(self) -> None:
        """Stop after a failure elsewhere: let queued writes end, close the file (which the caller removes)."""
        try:
            self._drain()
        except (OSError, ZhllamaError):
            pass  # the failure being handled is the one to report
        self.fh.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        info = self.expected.pop(0)
        if info.name != name or tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(f"internal error: shard {self.path.name} expected {info}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._write(_bytes_of(tensor), name)

    def write_parts(self, name: str, parts: list["torch.Tensor | ByteRange"]) -> None:
        """Tensor ``name`` as the concatenation of ``parts``' bytes: tensors (of its dtype) and byte
        ranges of other files, copied file to file in the kernel (so a writer that hashes what it
        writes, whose bytes must pass through it, takes no byte ranges)."""
        info = self.expected.pop(0)
        sizes = [p.length if isinstance(p, ByteRange) else p.numel() * p.element_size() for p in parts]
        wrong_dtype = any(not isinstance(p, ByteRange) and p.dtype != info.dtype for p in parts)
        ranges_hashed = self.sha256 is not None and any(isinstance(p, ByteRange) for p in parts)
        if info.name != name or sum(sizes) != info.numel * info.dtype.itemsize or wrong_dtype or ranges_hashed:
            raise RuntimeError(f"internal error: shard {self.path.name} expected {info}, got {name} in parts of {sizes} bytes")
        for part in parts:
            if isinstance(part, ByteRange):
                self._submit(_copy_range, part, self.fh.fileno(), nbytes=0)
            else:
                self._write(_bytes_of(part))
        if self._pending:
            self._written[name] = self._pending[-1][0]

    def close(self) -> str | None:
        """Finish the file and return its SHA-256 (None when made with ``digest=False``)."""
        try:
            self._drain()
        finally:
            self.fh.close()
        if self.expected:
            raise RuntimeError(f"internal error: shard {self.path.name} is missing {[t.name for t in self.expected]}")
        return self.sha256.hexdigest() if self.sha256 is not None else None


def read_range(source: ByteRange, info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` on its bytes ``source``: a copy-on-write memory map of the file, so the
    bytes come from the page cache as the tensor is read, and nothing is copied up front."""
    import numpy as np

    if source.length != info.numel * info.dtype.itemsize:
        raise RuntimeError(f"internal error: {source.length} bytes for {info}")
    if source.path.stat().st_size < source.offset + source.length:
        raise ZhllamaError(f"{source.path}: ends before byte {source.offset + source.length}; the file is truncated")
    if not source.length:
        return torch.empty(info.shape, dtype=info.dtype)
    data = np.memmap(source.path, dtype=np.uint8, mode="c", offset=source.offset, shape=(source.length,))
    return torch.from_numpy(data).view(info.dtype).reshape(info.shape)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def tied_embeddings(checkpoint: "Checkpoint", config: dict) -> bool:
    """Whether a checkpoint's LM head is its input embedding: it stores no ``lm_head.weight``,
    or its config says so (when it is silent, the architecture's default)."""
    if OUTPUT_EMBEDDING not in checkpoint.tensors:
        return True
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(str(checkpoint.model_dir)), "tie_word_embeddings", False))


def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZhllamaError(f"{model_dir / 'config.json'}: unreadable ({e})") from e


def write_config(model_dir: Path, out: Path, dtype: str, vocab_rows: int) -> None:
    """The base's config.json with the embedding's real row count and the new dtype; its generation config."""
    config = read_config(model_dir)
    config["vocab_size"] = vocab_rows  # whatever the base config said (a classic cause of broken merges)
    config["dtype"] = dtype
    if "torch_dtype" in config:  # written by transformers 4.x
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (model_dir / "generation_config.json").is_file():
        shutil.copy2(model_dir / "generation_config.json", out / "generation_config.json")
    else:
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(out))).save_pretrained(str(out))
