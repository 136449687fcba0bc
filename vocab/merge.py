"""``zhllama vocab merge``: append Chinese pieces to a LLaMA tokenizer without moving anything.

What the merge guarantees, and how:

- base pieces 0..N-1 and the trainer/normaliser specs are copied byte for byte; new pieces are
  only appended, so every original id keeps its meaning (and its embedding row);
- by default only CJK pieces are added (Han, CJK punctuation, full-width forms, an optional
  leading ``▁``), so no merge can fire on text without a CJK character: such text encodes
  exactly as before (Chinese-LLaMA's merge changed 9% of Frankenstein's lines);
- new pieces score below every base piece, in the order of the model they come from, with
  distinct scores (no ties: SentencePiece breaks ties by position, ``tokenizers`` by rank, so
  tied scores are where the HF tokenizer and SentencePiece part ways);
- no dead pieces: a piece BPE can never produce wastes an embedding row that never trains.
  Every added piece is checked by encoding its own text with the merged model; a piece that
  does not come out whole gets the missing intermediate piece (the first pair its encoding
  leaves unmerged) or, failing that, is dropped. Pieces whose characters are not in the
  vocabulary get those characters first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from zhllama.chain import WEIGHT_SUFFIXES, model_fingerprint
from zhllama.errors import ZhllamaError
from zhllama.args import OutputArgs
from zhllama.options import option
from zhllama.outdir import atomic_output_dir, check_output_target
from zhllama.provenance import describe_input, write_manifest
from zhllama.vocab.hf import save_hf_tokenizer, unbuildable_pieces
from zhllama.vocab.spmodel import (
    NORMAL,
    SPACE,
    TOKENIZER_MODEL,
    USER_DEFINED,
    ModelProto,
    is_cjk_char,
    is_cjk_piece,
    is_printable_piece,
    load_sp_proto,
    piece_text,
    processor_from_proto,
    require_bpe_model,
)

MAX_FIX_ROUNDS = 8


@dataclass(kw_only=True)
class MergeOptions(OutputArgs):
    """Options of ``zhllama vocab merge``."""

    base: Path = option(help="base tokenizer: a tokenizer.model file or a model/tokenizer directory holding one")
    add: list[Path] = option(
        help="SentencePiece model whose pieces to add (repeatable; added in the order given)", default_factory=list
    )
    words: list[Path] = option(help="file of whole words to add, one per line (repeatable)", default_factory=list)
    all_pieces: bool = option(False, help="add non-CJK pieces too (text without CJK may then encode differently)")
    model_max_length: int = option(4096, help="model_max_length written to tokenizer_config.json")

    def problems(self) -> list[str]:
        problems = []
        if not self.add and not self.words:
            problems.append("pass at least one --add SP_MODEL or --words FILE")
        if self.model_max_length < 1:
            problems.append(f"--model-max-length must be positive, got {self.model_max_length}")
        return problems


@dataclass
class MergeReport:
    """What ``zhllama vocab merge`` did: the counts in zhllama.json, and where it wrote."""

    base_pieces: int = 0
    merged_pieces: int = 0
    candidates: int = 0
    added: int = 0  # every appended piece, intermediates included
    duplicates_skipped: int = 0
    non_cjk_skipped: int = 0
    intermediates_added: int = 0
    unreachable_dropped: int = 0
    base_pieces_changed: int = 0
    dropped_examples: list[str] = field(default_factory=list)
    out: Path | None = None

    def summary(self) -> str:
        return (
            f"wrote {self.out}: {self.base_pieces:,} + {self.added:,} = {self.merged_pieces:,} pieces "
            f"({self.intermediates_added} intermediates, {self.duplicates_skipped} duplicates and "
            f"{self.non_cjk_skipped} non-CJK pieces skipped, {self.unreachable_dropped} unreachable dropped)"
        )


def read_words(path: Path) -> list[str]:
    """Words of a ``--words`` file, one per line; spaces become ▁ as in pieces."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ZhllamaError(f"{path}: no such words file") from e
    except UnicodeDecodeError as e:
        raise ZhllamaError(f"{path}: not valid UTF-8 at byte {e.start}") from e
    except OSError as e:
        raise ZhllamaError(f"{path}: cannot read: {e.strerror or e}") from e
    return [line.strip().replace(" ", SPACE) for line in text.splitlines() if line.strip()]


def candidate_pieces(add_models: Sequence[tuple[str, ModelProto]], words: Sequence[str]) -> list[str]:
    """Pieces to consider, in order: each added model's normal pieces by id, then the words."""
    pieces = []
    for _, proto in add_models:
        pieces += [p.piece for p in proto.pieces if p.type in (NORMAL, USER_DEFINED)]
    return pieces + list(words)


def score_slots(base: ModelProto, count: int) -> list[float]:
    """``count`` distinct float32 scores below every base score, best first.

    LLaMA's lowest score is -1e9 (its whitespace runs), where float32 steps are 64 apart, so
    the step is chosen from the float32 spacing there; scores are checked to stay distinct.
    """
    lowest = min(p.score for p in base.pieces)
    # float32 steps widen with magnitude; measure them well beyond the last score we assign
    beyond = np.float32(2.0 * abs(lowest) + count + 1.0)
    step = max(1.0, 2.0 * float(np.spacing(beyond)))
    scores = [float(np.float32(lowest - step * (i + 1))) for i in range(count)]
    if len(set(scores)) != count:
        raise ZhllamaError(f"cannot give {count} added pieces distinct scores below {lowest}")
    return scores


def build_merged(base: ModelProto, added: list[str]) -> ModelProto:
    """The base model with ``added`` appended as NORMAL pieces with descending scores."""
    merged = ModelProto()
    merged.CopyFrom(base)
    for piece, score in zip(added, score_slots(base, len(added))):
        new = merged.pieces.add()
        new.piece, new.score, new.type = piece, score, NORMAL
    return merged


def isolated_encodings(merged: ModelProto, pieces: list[str]) -> list[list[str]]:
    """How the merged model segments each piece's own text, without the dummy prefix."""
    probe = ModelProto()
    probe.CopyFrom(merged)
    probe.normalizer_spec.add_dummy_prefix = False
    probe.normalizer_spec.remove_extra_whitespaces = False
    processor = processor_from_proto(probe)
    return processor.encode([piece_text(p) for p in pieces], out_type=str)


def with_missing_characters(piece: str, known: set[str]) -> list[str]:
    """Single characters of ``piece`` not yet in the vocabulary (each must come first)."""
    missing = []
    for ch in piece:
        if ch not in known and ch not in missing:
            missing.append(ch)
    return missing


def select_candidates(base: ModelProto, candidates: list[str], all_pieces: bool, report: MergeReport) -> list[str]:
    """Filter candidates (duplicates, non-CJK) and put missing characters before their piece."""
    known = {p.piece for p in base.pieces}
    chosen_set: set[str] = set()
    present = set(known)  # base pieces and everything chosen so far
    chosen: list[str] = []
    for piece in candidates:
        if piece in chosen_set:
            continue  # already added earlier, as a character another piece needed
        if piece in known:
            report.duplicates_skipped += 1
            continue
        if not is_printable_piece(piece) or not (all_pieces or is_cjk_piece(piece)):
            report.non_cjk_skipped += 1
            continue
        missing = with_missing_characters(piece, present) if len(piece) > 1 else []
        if not all_pieces and not all(is_cjk_char(ch) for ch in missing):
            report.non_cjk_skipped += 1  # would need a new non-CJK character: changes other text
            continue
        for ch in missing:
            chosen.append(ch)
            chosen_set.add(ch)
            present.add(ch)
        chosen.append(piece)
        chosen_set.add(piece)
        present.add(piece)
    return chosen


def unreachable_added(base: ModelProto, added: list[str]) -> dict[str, list[str]]:
    """Added pieces that do not come out whole, with how the merged model segments them.

    A piece counts as reachable when SentencePiece encodes its own text (no dummy prefix) to
    exactly that piece, and ``tokenizers`` can build it as one merge of two pieces.
    """
    merged = build_merged(base, added)
    not_hf_buildable = set(unbuildable_pieces(merged))
    return {
        piece: segments
        for piece, segments in zip(added, isolated_encodings(merged, added))
        if segments != [piece] or piece in not_hf_buildable
    }


def make_reachable(base: ModelProto, added: list[str], allowed: Callable[[str], bool]) -> list[str]:
    """Insert missing intermediates, then drop what stays unreachable, until every added piece
    is reachable (see :func:`unreachable_added`).

    Fixing: a piece whose own text ends as segments ``[a, b, c, ...]`` gets ``a+b`` inserted
    just before it (so it outranks the piece it helps build), if ``allowed`` (the CJK rule).
    Dropping repeats until stable, because a dropped piece may have been another piece's half.
    """
    for _ in range(MAX_FIX_ROUNDS):
        broken = unreachable_added(base, added)
        if not broken:
            return added
        vocab = {p.piece for p in base.pieces} | set(added)
        fixed: list[str] = []
        for piece in added:
            segments = broken.get(piece)
            if segments is not None and len(segments) > 2:
                intermediate = "".join(segments[:2])
                if intermediate not in vocab and allowed(intermediate):
                    fixed.append(intermediate)
                    vocab.add(intermediate)
            fixed.append(piece)
        if fixed == added:
            break  # nothing left to fix: drop what is broken
        added = fixed
    while broken := unreachable_added(base, added):
        added = [piece for piece in added if piece not in broken]
    return added


def count_changed_base_pieces(base: ModelProto, merged: ModelProto) -> int:
    """Base pieces whose bytes (piece, score, type) differ in the merged model (must be 0)."""
    return sum(a.SerializeToString() != b.SerializeToString() for a, b in zip(base.pieces, merged.pieces))


def merge_sp_models(
    base: ModelProto, add_models: Sequence[tuple[str, ModelProto]], words: Sequence[str] = (), *, all_pieces: bool = False
) -> tuple[ModelProto, MergeReport]:
    """The merged model and its counts, in memory (no files).

    ``add_models`` are ``(name, proto)`` pairs, added in that order, then ``words``.
    """
    report = MergeReport(base_pieces=len(base.pieces))
    candidates = candidate_pieces(add_models, list(words))
    report.candidates = len(candidates)
    chosen = select_candidates(base, candidates, all_pieces, report)
    added = make_reachable(base, chosen, (lambda piece: True) if all_pieces else is_cjk_piece)
    kept = set(added)
    dropped = [piece for piece in chosen if piece not in kept]
    report.unreachable_dropped = len(dropped)
    report.dropped_examples = dropped[:20]
    merged = build_merged(base, added)
    report.merged_pieces = len(merged.pieces)
    report.added = len(added)
    candidate_set = set(candidates)
    report.intermediates_added = sum(1 for piece in added if piece not in candidate_set)
    report.base_pieces_changed = count_changed_base_pieces(base, merged)
    if report.base_pieces_changed or merged.trainer_spec != base.trainer_spec or merged.normalizer_spec != base.normalizer_spec:
        raise ZhllamaError("internal error: the merge changed base pieces or specs; please report this input")
    return merged, report


def describe_base(base: Path) -> dict:
    """The manifest entry of ``--base``: the hash of the one file read, ``tokenizer.model``.

    A model directory's weights are not read, so not hashed (that would read the whole model);
    its fingerprint, the identity ``extend`` records, ties the tokenizer to that model.
    """
    base = Path(base).expanduser()
    if not base.is_dir():
        return describe_input(base)
    entry = describe_input(base, only=(TOKENIZER_MODEL,))
    if (base / "config.json").is_file() and any(p.suffix in WEIGHT_SUFFIXES for p in base.iterdir()):
        entry["fingerprint"] = model_fingerprint(base)
    return entry


def merge_tokenizers(options: MergeOptions) -> MergeReport:
    """Merge Chinese SentencePiece pieces into a base LLaMA tokenizer, keeping every base id.

    Writes ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json`` and ``zhllama.json`` into ``options.out`` atomically.
    """
    started = time.time()
    check_output_target(options.out, options.overwrite)
    base = load_sp_proto(options.base, role="base tokenizer")
    require_bpe_model(base, options.base)
    add_models = [(str(path), load_sp_proto(path, role="--add model")) for path in options.add]
    words = [w for path in options.words for w in read_words(Path(path))]
    merged, report = merge_sp_models(base, add_models, words, all_pieces=options.all_pieces)
    with atomic_output_dir(options.out, overwrite=options.overwrite) as tmp:
        (tmp / TOKENIZER_MODEL).write_bytes(merged.SerializeToString())
        save_hf_tokenizer(tmp / TOKENIZER_MODEL, tmp, model_max_length=options.model_max_length)
        write_manifest(
            tmp,
            command="vocab merge",
            options=options,
            inputs={"base": describe_base(options.base), "add": list(options.add), "words": list(options.words)},
            figures={**{k: v for k, v in report.__dict__.items() if k != "out"}, "seconds": round(time.time() - started, 2)},
            vocab_size=len(merged.pieces),
        )
    report.out = Path(options.out)
    return report
