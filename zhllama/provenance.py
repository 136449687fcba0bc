"""``zhllama.json``: what every output directory says about itself, written and read here only.

:func:`write_manifest` records the command, its resolved options, the inputs with content
hashes, library versions, the key figures and (for anything made from a model) the chain it
was made from. :func:`read_manifest` gives it back as a :class:`Manifest` (a dict), whose properties are
the facts later stages rely on (the vocabulary size before ``zhllama extend``, the base a chain
was trained on, the SFT template), so each fact has one name and one place in the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from zhllama.errors import ZhllamaError

MANIFEST = "zhllama.json"
_VERSIONED = ("zhllama", "torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "trl", "sentencepiece", "safetensors")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    except OSError as e:
        raise ZhllamaError(f"{path}: cannot read: {e.strerror or e}") from e
    return digest.hexdigest()


def describe_input(path: str | Path, *, only: tuple[str, ...] | None = None) -> dict:
    """A manifest entry for one input: path, size and hash (a directory: each file in it, or
    just the files named in ``only`` — those a command reads of a larger directory)."""
    path = Path(path)
    if path.is_dir():
        if only is not None:
            files = [path / name for name in only]
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return {
            "path": str(path.resolve()),
            "files": {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
        }
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour our outputs depend on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_manifest(
    directory: str | Path,
    *,
    command: str,
    options: Any = None,
    inputs: Mapping[str, Any] | None = None,
    figures: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict:
    """Write ``zhllama.json`` into ``directory`` and return what was written.

    ``inputs`` maps a role ("corpus", "base_tokenizer", ...) to a path, a list of paths, or an
    already-built description; paths are described with :func:`describe_input`.
    """

    def describe(value: Any) -> Any:
        if isinstance(value, (str, Path)) and Path(value).exists():
            return describe_input(value)
        if isinstance(value, (list, tuple)):
            return [describe(v) for v in value]
        return _jsonable(value)

    manifest = {
        "command": command,
        "argv": sys.argv[1:] if Path(sys.argv[0]).name in ("zhllama", "__main__.py") else None,
        "options": _jsonable(options) if options is not None else {},
        "inputs": {role: describe(value) for role, value in (inputs or {}).items()},
        "figures": _jsonable(figures or {}),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{k: _jsonable(v) for k, v in extra.items()},
    }
    with open(Path(directory) / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, ensure_ascii=False, indent=2)
        fh.write("\n")
    return manifest


class Manifest(dict):
    """A parsed ``zhllama.json``: the mapping as written, plus one typed name for each fact
    that later stages read."""

    @property
    def figures(self) -> dict:
        return self.get("figures") or {}

    @property
    def base_vocab_size(self) -> int | None:
        """Rows the model had before ``zhllama extend`` (written by extend, carried by merge)."""
        return self.figures.get("base_vocab_size")

    @property
    def model_fingerprint(self) -> str | None:
        """The fingerprint of the base an adapter was trained on."""
        return (self.get("chain") or {}).get("model_fingerprint")

    @property
    def template(self) -> str | None:
        """The prompt template a model answers in: recorded by sft (and dpo), carried by merge."""
        return self.get("template")


def read_manifest(directory: str | Path) -> Manifest | None:
    """The ``zhllama.json`` of a directory, or None when it has none (e.g. a hub checkpoint)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZhllamaError(f"{path}: unreadable manifest ({e}); was this directory written by zhllama?") from e
    if not isinstance(data, dict):
        raise ZhllamaError(f"{path}: not a zhllama manifest (expected a JSON object)")
    return Manifest(data)
