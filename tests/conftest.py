"""Fixtures shared by every stage's tests: the real assets (when present) and the built-in tiny
default (a LLaMA-style base tokenizer and random tiny LLaMAs), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """../shared/assets; tests using it are marked real_assets and skip when it is absent."""
    if not ASSETS.is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (they live beside the repository as ../shared/assets)")
    return ASSETS


@pytest.fixture(scope="session")
def base_tokenizer_dir(tmp_path_factory) -> Path:
    """A LLaMA-style base tokenizer directory (BPE, byte fallback, split digits, 1000 pieces)."""
    from zhllama.demo import tiny

    return tiny.write_base_tokenizer(tmp_path_factory.mktemp("base_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, base_tokenizer_dir) -> Path:
    """A random tiny LLaMA (untied embeddings) with the base tokenizer beside it."""
    from zhllama.demo import tiny

    return tiny.write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), base_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, base_tokenizer_dir) -> Path:
    """A random tiny LLaMA with tied input and output embeddings."""
    from zhllama.demo import tiny

    return tiny.write_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tied"), base_tokenizer_dir, tied=True)


@pytest.fixture(scope="session")
def chinese_corpus(tmp_path_factory) -> Path:
    """A few thousand lines of Chinese text made from jieba's dictionary."""
    from zhllama.demo import tiny

    return tiny.write_lines(tmp_path_factory.mktemp("corpus") / "zh.txt", tiny.chinese_sentences(3000, seed=7))


@pytest.fixture(scope="session")
def zh_sp_dir(tmp_path_factory, chinese_corpus) -> Path:
    """A small Chinese SentencePiece model trained by 'zhllama vocab train' (chinese_sp.model inside)."""
    from zhllama.cli import main

    out = tmp_path_factory.mktemp("zh_sp") / "vocab"
    assert main(["vocab", "train", str(chinese_corpus), "--out", str(out), "--vocab-size", "3000"]) == 0
    return out


@pytest.fixture(scope="session")
def merged_tokenizer_dir(tmp_path_factory, base_tokenizer_dir, zh_sp_dir) -> Path:
    """The base tokenizer merged with the small Chinese model by 'zhllama vocab merge'."""
    from zhllama.cli import main

    out = tmp_path_factory.mktemp("merged") / "tokenizer"
    args = ["vocab", "merge", "--base", str(base_tokenizer_dir), "--add", str(zh_sp_dir / "chinese_sp.model"), "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture
def one_torch_thread():
    """Run a test's tiny models on one thread: two threads only add synchronisation at these
    sizes, and a fixed thread count keeps float sums (hence resumed-run comparisons) stable."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
