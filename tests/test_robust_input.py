"""Bad input, everywhere: every row of docs/errors.md, run through the real CLI.

Each case builds a broken input, runs ``zhllama ...`` in-process and checks the promise of
the CLI: non-zero exit, exactly one ``zhllama: error:`` line and it comes last on stderr (after
any progress bars), no traceback, the message names the file (or flag) at fault, and no output
directory or temporary sibling of it is left behind. The case ids are the ids in the table of
docs/errors.md (a test below keeps the two in step).
"""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from robust_fixtures import IS_ROOT, TRAIN_FLAGS, Chain, build_chain, cli, error_line, leftovers, read_only_directory, small_filesystem

from zhllama.demo import tiny

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Ctx:
    tmp: Path
    chain: Chain
    base_tokenizer_dir: Path
    merged_tokenizer_dir: Path
    zh_sp_dir: Path
    tiny_model_dir: Path
    monkeypatch: pytest.MonkeyPatch
    mounts: list[Path] = field(default_factory=list)  # tmpfs mounted for the case, unmounted after

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def copy(self, source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, self.tmp / name))


# id -> function(ctx) returning (argv, text the error line must contain)
CASES: dict[str, Callable[[Ctx], tuple[list, str]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def train(ctx: Ctx, corpus, *extra) -> list:
    return ["vocab", "train", corpus, "--out", ctx.out, "--vocab-size", "300", *extra]


def pretrain(ctx: Ctx, *extra, data=None) -> list:
    return [
        "pretrain", "--stage", "1", "--model", ctx.chain.extended, "--data", data or ctx.chain.corpus, "--out", ctx.out,
        "--block-size", "32", "--validation-split", "0", "--cache-dir", ctx.tmp / "cache", "--max-steps", "1", *TRAIN_FLAGS, *extra,
    ]  # fmt: skip


def evaluate(ctx: Ctx, model, *extra) -> list:
    return ["eval", "--model", model, "--data", ctx.chain.corpus, "--block-size", "32", "--max-documents", "2", *extra]


def sft(ctx: Ctx, data, *extra, template="alpaca") -> list:
    return ["sft", "--model", ctx.chain.extended, "--data", data, "--template", template, "--out", ctx.out, "--max-steps", "1", *TRAIN_FLAGS, *extra]


def merge(ctx: Ctx, model, adapter, *extra) -> list:
    return ["merge", "--model", model, "--adapter", adapter, "--out", ctx.out, *extra]


ZH = "\n".join(tiny.chinese_sentences(50, seed=3)) + "\n"


# ---- corpus files ---------------------------------------------------------------------------
@case("corpus-missing")
def _(ctx):
    return train(ctx, ctx.tmp / "nowhere.txt"), "nowhere.txt: no such file or directory"


@case("corpus-unreadable")
def _(ctx):
    path = ctx.text("locked.txt", ZH)
    os.chmod(path, 0)
    if IS_ROOT:
        # root reads through mode bits: simulate the EACCES a normal user gets from open()
        real_open = builtins.open

        def denying_open(file, *args, **kwargs):
            if Path(str(file)) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        ctx.monkeypatch.setattr(builtins, "open", denying_open)
    return train(ctx, path), "locked.txt: cannot open: Permission denied"


@case("corpus-not-utf8-strict")
def _(ctx):
    path = ctx.text("latin1.txt", ZH.encode("utf-8") + "café\n".encode("latin-1"))
    return train(ctx, path, "--strict"), "latin1.txt:51: not valid UTF-8"


@case("corpus-all-lines-not-utf8")
def _(ctx):
    return train(ctx, ctx.text("gbk.txt", ZH.encode("gb18030"))), "gbk.txt: corpus has no non-empty documents"


@case("corpus-empty")
def _(ctx):
    return train(ctx, ctx.text("empty.txt", "")), "empty.txt: corpus has no non-empty documents"


@case("corpus-blank-lines-only")
def _(ctx):
    return train(ctx, ctx.text("blank.txt", "\n \n\t\n")), "blank.txt: corpus has no non-empty documents"


@case("corpus-directory-without-corpus-files")
def _(ctx):
    (ctx.tmp / "docs").mkdir()
    ctx.text("docs/readme.md", "not a corpus")
    return train(ctx, ctx.tmp / "docs"), "docs: directory holds no corpus files"


@case("corpus-glob-matches-nothing")
def _(ctx):
    return train(ctx, ctx.tmp / "nothing-*.txt"), "nothing-*.txt: glob matches no files"


@case("corpus-gzip-truncated")
def _(ctx):
    path = ctx.text("cut.txt.gz", gzip.compress(ZH.encode("utf-8") * 20))
    truncate(path)
    return train(ctx, path), "cut.txt.gz: corrupt or truncated gzip data"


@case("corpus-gzip-corrupt")
def _(ctx):
    data = bytearray(gzip.compress(ZH.encode("utf-8") * 20))
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    return train(ctx, ctx.text("flipped.txt.gz", bytes(data))), "flipped.txt.gz: corrupt or truncated gzip data"


@case("corpus-gzip-not-gzip")
def _(ctx):
    return train(ctx, ctx.text("plain.txt.gz", ZH)), "plain.txt.gz: corrupt or truncated gzip data"


@case("corpus-jsonl-malformed")
def _(ctx):
    lines = [json.dumps({"text": s}, ensure_ascii=False) for s in tiny.chinese_sentences(5, seed=4)]
    lines[2] = lines[2][:-3]  # record 3 loses its closing quote and brace
    return train(ctx, ctx.text("bad.jsonl", "\n".join(lines) + "\n")), "bad.jsonl:3: malformed JSON"


@case("corpus-json-array-malformed")
def _(ctx):
    records = json.dumps([{"text": s} for s in tiny.chinese_sentences(5, seed=4)], ensure_ascii=False, indent=1)
    return train(ctx, ctx.text("bad.json", records.replace("},", "}", 1))), "bad.json:5: malformed JSON after record 1"


@case("corpus-json-wrong-field")
def _(ctx):
    path = ctx.text("fields.jsonl", "\n".join(json.dumps({"content": s}, ensure_ascii=False) for s in ZH.split()) + "\n")
    return train(ctx, path), "fields.jsonl:1: record has no field 'text' (fields: content); set --text-field"


@case("corpus-json-not-objects")
def _(ctx):
    return train(ctx, ctx.text("numbers.json", "[1, 2, 3]")), "numbers.json record 1: expected a JSON object"


@case("corpus-parquet-corrupt")
def _(ctx):
    return train(ctx, ctx.text("broken.parquet", b"PAR1 not really parquet")), "broken.parquet: not a readable parquet file"


@case("pretrain-data-malformed-jsonl")
def _(ctx):
    path = ctx.text("train.jsonl", json.dumps({"text": ZH}, ensure_ascii=False) + "\n{oops\n")
    return pretrain(ctx, data=path), "train.jsonl:2: malformed JSON"


@case("pretrain-data-missing")
def _(ctx):
    return pretrain(ctx, data=ctx.tmp / "gone.txt"), "gone.txt: no such file or directory"


# ---- tokenizers -----------------------------------------------------------------------------
@case("tokenizer-base-missing")
def _(ctx):
    argv = ["vocab", "merge", "--base", ctx.tmp / "no_tokenizer", "--add", ctx.zh_sp_dir / "chinese_sp.model", "--out", ctx.out]
    return argv, "no_tokenizer: no such base tokenizer file or directory"


@case("tokenizer-model-truncated")
def _(ctx):
    path = truncate(Path(shutil.copy(ctx.base_tokenizer_dir / "tokenizer.model", ctx.tmp / "half.model")))
    argv = ["vocab", "merge", "--base", path, "--add", ctx.zh_sp_dir / "chinese_sp.model", "--out", ctx.out]
    return argv, "half.model: not a SentencePiece model"


@case("tokenizer-add-not-a-model")
def _(ctx):
    path = ctx.text("words.model", ZH)
    return ["vocab", "merge", "--base", ctx.base_tokenizer_dir, "--add", path, "--out", ctx.out], "words.model: not a SentencePiece model"


@case("tokenizer-dir-without-model")
def _(ctx):
    (ctx.tmp / "hf_only").mkdir()
    shutil.copy(ctx.base_tokenizer_dir / "tokenizer.json", ctx.tmp / "hf_only")
    argv = ["vocab", "merge", "--base", ctx.tmp / "hf_only", "--add", ctx.zh_sp_dir / "chinese_sp.model", "--out", ctx.out]
    return argv, "hf_only: no tokenizer.model in this base tokenizer directory (it has tokenizer.json)"


@case("words-file-not-utf8")
def _(ctx):
    path = ctx.text("words.txt", "中国\n".encode("gb18030"))
    argv = ["vocab", "merge", "--base", ctx.base_tokenizer_dir, "--words", path, "--out", ctx.out]
    return argv, "words.txt: not valid UTF-8"


@case("tokenizer-json-truncated")
def _(ctx):
    model = ctx.copy(ctx.chain.extended, "model_bad_tokenizer")
    truncate(model / "tokenizer.json")
    return evaluate(ctx, model), "model_bad_tokenizer"


@case("tokenizer-does-not-extend-model")
def _(ctx):
    other = tiny.write_base_tokenizer(ctx.tmp / "smaller_tokenizer", vocab_size=900)
    argv = ["extend", "--model", ctx.tiny_model_dir, "--tokenizer", other, "--out", ctx.out]
    return argv, "smaller_tokenizer has 900 pieces, fewer than the 1000"


@case("tokenizer-larger-than-model")
def _(ctx):
    model = ctx.copy(ctx.tiny_model_dir, "unextended_with_merged_tokenizer")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ctx.merged_tokenizer_dir / name, model / name)
    return evaluate(ctx, model), "unextended_with_merged_tokenizer has 1000 embedding rows; run 'zhllama extend'"


# ---- models and adapters --------------------------------------------------------------------
@case("model-dir-missing")
def _(ctx):
    return evaluate(ctx, ctx.tmp / "no_model"), "no_model: model directory does not exist"


@case("model-without-config")
def _(ctx):
    model = ctx.copy(ctx.chain.extended, "configless")
    (model / "config.json").unlink()
    return evaluate(ctx, model), "configless: no config.json"


@case("model-weights-truncated")
def _(ctx):
    model = ctx.copy(ctx.chain.extended, "half_weights")
    truncate(model / "model.safetensors")
    return evaluate(ctx, model), "half_weights"


@case("merge-model-weights-truncated")
def _(ctx):
    model = ctx.copy(ctx.chain.extended, "half_weights")
    truncate(model / "model.safetensors")
    return merge(ctx, model, ctx.chain.stage1, "--allow-base-mismatch"), "half_weights"


@case("adapter-without-config")
def _(ctx):
    adapter = ctx.copy(ctx.chain.stage1, "no_config")
    (adapter / "adapter_config.json").unlink()
    return evaluate(ctx, ctx.chain.extended, "--adapter", adapter), "no_config: no adapter_config.json"


@case("adapter-config-malformed")
def _(ctx):
    adapter = ctx.copy(ctx.chain.stage1, "bad_config")
    (adapter / "adapter_config.json").write_text("{not json", encoding="utf-8")
    return evaluate(ctx, ctx.chain.extended, "--adapter", adapter), "bad_config/adapter_config.json"


@case("adapter-weights-truncated")
def _(ctx):
    adapter = ctx.copy(ctx.chain.stage1, "half_adapter")
    truncate(adapter / "adapter_model.safetensors")
    return evaluate(ctx, ctx.chain.extended, "--adapter", adapter), "half_adapter"


@case("merge-adapter-weights-truncated")
def _(ctx):
    adapter = ctx.copy(ctx.chain.stage1, "half_adapter")
    truncate(adapter / "adapter_model.safetensors")
    return merge(ctx, ctx.chain.extended, adapter), "half_adapter"


@case("adapter-manifest-corrupt")
def _(ctx):
    adapter = ctx.copy(ctx.chain.stage1, "bad_manifest")
    truncate(adapter / "zhllama.json")
    return evaluate(ctx, ctx.chain.extended, "--adapter", adapter), "bad_manifest/zhllama.json: unreadable manifest"


@case("adapter-for-another-base")
def _(ctx):
    return evaluate(ctx, ctx.chain.other_extended, "--adapter", ctx.chain.stage1), f"adapter {ctx.chain.stage1} was trained on a base"


@case("merge-adapter-for-another-base")
def _(ctx):
    return merge(ctx, ctx.chain.other_extended, ctx.chain.stage1), f"adapter {ctx.chain.stage1} was trained on a base"


# ---- instruction data -----------------------------------------------------------------------
@case("sft-unknown-template")
def _(ctx):
    path = tiny.write_json(ctx.tmp / "sft.json", tiny.instruction_records(8))
    return sft(ctx, path, template="vicuna-ish"), "unknown template 'vicuna-ish'"


@case("sft-data-missing")
def _(ctx):
    return sft(ctx, ctx.tmp / "absent.json"), "absent.json: no such file"


@case("sft-data-wrong-fields")
def _(ctx):
    records = [{"question": r["instruction"], "answer": r["output"]} for r in tiny.instruction_records(8)]
    return sft(ctx, tiny.write_json(ctx.tmp / "qa.json", records)), "no usable instruction records in"


@case("sft-data-malformed-json")
def _(ctx):
    lines = [json.dumps(r, ensure_ascii=False) for r in tiny.instruction_records(4)]
    lines[1] = lines[1][: len(lines[1]) // 2]
    return sft(ctx, ctx.text("sft.jsonl", "\n".join(lines) + "\n")), "sft.jsonl:2: malformed JSON"


@case("sft-data-not-utf8")
def _(ctx):
    text = json.dumps(tiny.instruction_records(4), ensure_ascii=False)
    return sft(ctx, ctx.text("gbk.json", text.encode("gb18030"))), "gbk.json: not valid UTF-8"


# ---- flags ----------------------------------------------------------------------------------
@case("unknown-command")
def _(ctx):
    return ["pretrian", "--stage", "1"], "unknown command 'pretrian'"


@case("missing-required-flag")
def _(ctx):
    return ["vocab", "train", ctx.chain.corpus], "zhllama vocab train: the following arguments are required: --out"


@case("unknown-flag")
def _(ctx):
    return ["vocab", "merge", "--base", ctx.base_tokenizer_dir, "--add", "x", "--out", ctx.out, "--colour"], "unrecognized arguments: --colour"


@case("unknown-training-flag")
def _(ctx):
    return pretrain(ctx, "--learning-rte", "1e-3"), "--learning-rte"


@case("vocab-size-too-small")
def _(ctx):
    return train(ctx, ctx.chain.corpus, "--vocab-size", "5"), "--vocab-size must be at least 10"


@case("extend-init-corpus-without-subword-mean")
def _(ctx):
    argv = ["extend", "--model", ctx.tiny_model_dir, "--tokenizer", ctx.merged_tokenizer_dir, "--out", ctx.out,
            "--init", "random", "--init-corpus", ctx.chain.corpus]  # fmt: skip
    return argv, "--init-corpus trains the rows --init subword-mean starts"


@case("extend-max-shard-size-unparseable")
def _(ctx):
    argv = ["extend", "--model", ctx.tiny_model_dir, "--tokenizer", ctx.merged_tokenizer_dir, "--out", ctx.out, "--max-shard-size", "2XB"]
    return argv, "--max-shard-size: '2XB' is not a size like 2GB"


@case("vocab-merge-nothing-to-add")
def _(ctx):
    return ["vocab", "merge", "--base", ctx.base_tokenizer_dir, "--out", ctx.out], "pass at least one --add SP_MODEL or --words FILE"


@case("streaming-without-max-steps")
def _(ctx):
    argv = pretrain(ctx, "--streaming")
    i = argv.index("--max-steps")
    return argv[:i] + argv[i + 2 :], "--streaming has no length to count epochs from; pass --max-steps N"


@case("stage1-trains-nothing")
def _(ctx):
    return pretrain(ctx, "--train-embeddings", "none"), "--stage 1 --train-embeddings none would train nothing"


@case("data-weights-count")
def _(ctx):
    return pretrain(ctx, "--data", ctx.chain.corpus, "--data-weights", "1"), "--data-weights needs one weight per --data source: 2 source(s), 1 weight(s)"


@case("data-weights-negative")
def _(ctx):
    return sft(ctx, ctx.text("a.jsonl", '{"instruction": "a", "output": "b"}\n'), "--data-weights", "-0.1"), "--data-weights must not be negative (got -0.1)"


@case("data-weights-zero")
def _(ctx):
    return pretrain(ctx, "--data", ctx.chain.corpus, "--data-weights", "0", "0"), "--data-weights are all zero"


@case("validation-data-empty-name")
def _(ctx):
    return pretrain(ctx, "--validation-data", "=held.txt"), "--validation-data '=held.txt': empty name before '='"


@case("validation-data-bad-name")
def _(ctx):
    return pretrain(ctx, "--validation-data", "z h=held.txt"), "name 'z h' may hold only letters, digits"


@case("block-size-beyond-context")
def _(ctx):
    return pretrain(ctx, "--block-size", "100000"), "--block-size 100000 exceeds the model's context"


@case("resume-from-missing-checkpoint")
def _(ctx):
    return pretrain(ctx, "--resume-from-checkpoint", ctx.tmp / "checkpoint-9"), "checkpoint-9: not a Trainer checkpoint"


@case("config-yaml-malformed")
def _(ctx):
    return pretrain(ctx, "--config", ctx.text("run.yaml", "learning_rate: [1e-4\n")), "run.yaml: malformed YAML"


@case("merge-gguf-wrong-suffix")
def _(ctx):
    return merge(ctx, ctx.chain.extended, ctx.chain.stage1, "--gguf", ctx.tmp / "model.bin"), "--gguf: "


@case("output-exists")
def _(ctx):
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("results of another run")
    return train(ctx, ctx.chain.corpus), "out: output directory exists and is not empty; pass --overwrite"


@case("output-parent-is-a-file")
def _(ctx):
    ctx.text("file", "x")
    return ["vocab", "train", ctx.chain.corpus, "--out", ctx.tmp / "file" / "out"], "file/out"


# ---- the disk ---------------------------------------------------------------------------------
@case("disk-full-while-writing")
def _(ctx):
    # the merged tokenizer directory (~100 KB) cannot fit in a 64 KB file system
    out = small_filesystem(ctx, "64k") / "merged"
    return ["vocab", "merge", "--base", ctx.base_tokenizer_dir, "--add", ctx.zh_sp_dir / "chinese_sp.model", "--out", out], str(out)


@case("disk-full-while-writing-model")
def _(ctx):
    out = small_filesystem(ctx, "256k") / "extended"
    return ["extend", "--model", ctx.tiny_model_dir, "--tokenizer", ctx.merged_tokenizer_dir, "--out", out], str(out)


@case("output-on-read-only-filesystem")
def _(ctx):
    return ["vocab", "train", ctx.chain.corpus, "--out", read_only_directory(ctx) / "sp"], "small_fs is not writable"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir) -> Chain:
    return build_chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(
    name, tmp_path, chain, base_tokenizer_dir, merged_tokenizer_dir, zh_sp_dir, tiny_model_dir, monkeypatch, capsys
):
    ctx = Ctx(tmp_path, chain, base_tokenizer_dir, merged_tokenizer_dir, zh_sp_dir, tiny_model_dir, monkeypatch)
    try:
        argv, expected = CASES[name](ctx)
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        before = sorted(p.name for p in out.iterdir()) if out is not None and out.is_dir() else None
        code, err = cli(argv, capsys)
        line = error_line(code, err)
        assert expected in line, f"{line!r} should contain {expected!r}"
        if out is not None:
            left = leftovers(out)
            if before is None:
                assert left == [], f"left behind: {left}"
            else:  # an existing output stays exactly as it was
                assert left == [out] and sorted(p.name for p in out.iterdir()) == before
    finally:
        monkeypatch.undo()
        for mount_point in ctx.mounts:
            subprocess.run(["umount", str(mount_point)], check=False)


def test_errors_table_lists_every_case():
    """docs/errors.md has one row per case here, so the table cannot drift from the tests; a
    section that names its own test file instead has each of its cases named in that file."""
    table = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    rows: set[str] = set()
    for section in re.split(r"^## ", table, flags=re.MULTILINE):
        names = set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE))
        intro = section.split("\n| ", 1)[0]
        owner = re.search(r"`(tests/test_\w+\.py)", intro)
        if owner and owner.group(1) != "tests/test_robust_input.py":
            text = (REPO / owner.group(1)).read_text(encoding="utf-8")
            assert not [n for n in names if f'"{n}"' not in text], f"{owner.group(1)} lacks cases of docs/errors.md"
        else:
            rows |= names
    assert rows == set(CASES), f"only in docs: {sorted(rows - set(CASES))}; only in tests: {sorted(set(CASES) - rows)}"


def test_real_process_prints_one_line_and_exits_1(tmp_path):
    """The installed entry point, as a user runs it: stderr is exactly one line, exit status 1."""
    # The one beside the interpreter running the tests: .venv's under `make test`, and that of
    # whichever environment bench/compat.sh built, so each checks its own install.
    exe = Path(sys.executable).parent / "zhllama"
    if not exe.exists():
        pytest.skip(f"{exe} not installed (run 'make install')")
    missing = tmp_path / "missing.txt"
    done = subprocess.run([str(exe), "vocab", "train", str(missing), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr == f"zhllama: error: {missing}: no such file or directory\n"
    assert leftovers(tmp_path / "out") == []
