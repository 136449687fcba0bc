"""Helpers for the robustness tests (tests/test_robust_*.py): a tiny extended model with a
stage-1 adapter, a second extended model (another base), the CLI run in-process with its
stderr, the checks every failure must pass, a runner that kill -9s a real ``zhllama``
process at a chosen point, and small / read-only file systems (a real tmpfs when the tests
run as root, a simulation otherwise).

The chain is built once per session (cached here, since several test modules use it) with the
real commands: ``extend`` on the conftest tiny models and a few steps of ``pretrain --stage 1``.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from zhllama.demo import tiny
from zhllama.cli import main

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PYTHON = REPO / ".venv" / "bin" / "python"
# a tiny run's TrainingArguments: CPU, quiet, deterministic, a checkpoint every 2 steps
TRAIN_FLAGS = [
    "--use-cpu", "--disable-tqdm", "true", "--seed", "0", "--per-device-train-batch-size", "4",
    "--logging-steps", "1", "--save-steps", "2", "--report-to", "none",
]  # fmt: skip


def cli(argv: list, capsys=None) -> tuple[int, str]:
    """Run ``zhllama ARGV`` in this process; return (exit code, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def ok(argv: list) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"zhllama {' '.join(map(str, argv))} exited {code}"


def error_line(code: int, err: str) -> str:
    """The single ``zhllama: error:`` line of a failed run (progress bars may precede it)."""
    assert code != 0, f"expected failure, got exit {code}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("zhllama: error:")]
    assert len(errors) == 1, f"expected one error line, got: {err!r}"
    assert err.rstrip("\n").splitlines()[-1] == errors[0], f"the error line must come last: {err!r}"
    return errors[0]


def leftovers(out: Path) -> list[Path]:
    """``out`` itself and every temporary / old sibling of it."""
    out = Path(out)
    found = [out] if out.exists() else []
    return found + sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / "zhllama.json").read_text(encoding="utf-8"))


def dir_bytes(directory: Path, skip: tuple[str, ...] = ("zhllama.json",)) -> dict[str, bytes]:
    """Every file of a directory (manifest excluded: it records times and paths)."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name not in skip}


@dataclass
class Chain:
    corpus: Path  # Chinese training text
    extended: Path  # tiny model extended to the merged tokenizer
    stage1: Path  # a stage-1 adapter trained on `extended`
    other_extended: Path  # the tied tiny model extended to the same tokenizer: another base


_CHAIN: dict[tuple, Chain] = {}


def build_chain(tmp_path_factory, tiny_model_dir: Path, tiny_tied_model_dir: Path, merged_tokenizer_dir: Path) -> Chain:
    key = (str(tiny_model_dir), str(tiny_tied_model_dir), str(merged_tokenizer_dir))
    if key not in _CHAIN:
        work = tmp_path_factory.mktemp("robust_chain")
        corpus = tiny.write_lines(work / "train.txt", tiny.chinese_sentences(300, seed=11))
        ok(["extend", "--model", tiny_model_dir, "--tokenizer", merged_tokenizer_dir, "--out", work / "extended"])
        ok(["extend", "--model", tiny_tied_model_dir, "--tokenizer", merged_tokenizer_dir, "--out", work / "other"])
        ok([
            "pretrain", "--stage", "1", "--model", work / "extended", "--data", corpus, "--out", work / "stage1",
            "--block-size", "32", "--validation-split", "0", "--cache-dir", work / "cache", "--max-steps", "2",
            *TRAIN_FLAGS,
        ])  # fmt: skip
        _CHAIN[key] = Chain(corpus, work / "extended", work / "stage1", work / "other")
    return _CHAIN[key]


# Runs ``zhllama ARGV`` and SIGKILLs itself at a chosen point: when the function TARGET
# (module:qualified.name) is called for the N-th time, before it runs ("before") or after it
# returns ("after"). Deterministic, and the process really dies by SIGKILL: no cleanup, no
# finally blocks, no atexit handlers run.
_KILLER = r"""
import importlib, os, signal, sys
target, when, nth, argv = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
module_name, _, qualname = target.partition(":")
owner = importlib.import_module(module_name)
*path, attr = qualname.split(".")
for part in path:
    owner = getattr(owner, part)
original = getattr(owner, attr)
calls = [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, attr, wrapper)
from zhllama.cli import main
sys.exit(main(argv))
"""


def run_killed(target: str, when: str, nth: int, argv: list, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m zhllama ARGV`` in a real process that is SIGKILLed at ``target`` (see above).

    Asserts that the process did die by SIGKILL (the kill point was reached).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    done = subprocess.run(
        [python, "-c", _KILLER, target, when, str(nth), *map(str, argv)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO),
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (
        f"kill point {target} ({when}, call {nth}) not reached: exit {done.returncode}\n{done.stderr[-3000:]}"
    )
    return done


# ---- small and read-only file systems (ctx: a test_robust_input.Ctx) ----
def read_only_directory(ctx) -> Path:
    """A read-only tmpfs as root (EROFS); otherwise a directory without write permission."""
    mount_point = ctx.tmp / "small_fs"
    mount_point.mkdir()
    if IS_ROOT and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount_point)], capture_output=True)
        if mounted.returncode == 0:
            ctx.mounts.append(mount_point)
            return mount_point
    os.chmod(mount_point, 0o555)
    return mount_point


def small_filesystem(ctx, size: str) -> Path:
    """A tiny tmpfs when we may mount one (root on Linux); otherwise writes into a directory fail
    with ENOSPC the way a full disk's do (``write()`` raises, naming no file)."""
    mount_point = ctx.tmp / "small_fs"
    mount_point.mkdir()
    if IS_ROOT and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True)
        if mounted.returncode == 0:
            ctx.mounts.append(mount_point)
            return mount_point
    simulate_full_disk(ctx.monkeypatch, mount_point)
    return mount_point


def simulate_full_disk(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    real_open = builtins.open

    class FullFile:
        def __init__(self, fh):
            self._fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._fh.close()

    def full_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        inside = isinstance(file, (str, Path)) and str(Path(file).resolve()).startswith(str(root.resolve()))
        return FullFile(fh) if inside and any(c in mode for c in "wax") else fh

    monkeypatch.setattr(builtins, "open", full_open)
