"""Provenance: every output says which inputs (content hashes) and which versions made it, and a
chain whose recorded base does not match the model given is refused unless the expert asks.

Each command's ``zhllama.json`` is checked against the files it names: the hashes must be the
hashes of those files now, the model fingerprints those of the model directories given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from robust_fixtures import TRAIN_FLAGS, build_chain, cli, error_line, leftovers, manifest, ok

from zhllama.demo import tiny
from zhllama.chain import model_fingerprint
from zhllama.provenance import file_sha256

CORE_VERSIONS = ("zhllama", "python", "torch", "transformers", "tokenizers", "sentencepiece")


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir):
    return build_chain(tmp_path_factory, tiny_model_dir, tiny_tied_model_dir, merged_tokenizer_dir)


@pytest.fixture(scope="module")
def renamed_base(chain, tmp_path_factory) -> Path:
    """The extended model with an edited config.json: the same weights, another fingerprint —
    what a chain applied to the wrong base looks like, while still loadable for the override."""
    model = Path(shutil.copytree(chain.extended, tmp_path_factory.mktemp("renamed") / "extended"))
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 1.0001
    (model / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(model) != model_fingerprint(chain.extended)
    return model


def assert_versions(record: dict) -> None:
    versions = record["versions"]
    missing = [name for name in CORE_VERSIONS if not versions.get(name)]
    assert not missing, f"versions lack {missing}: {versions}"


def assert_file_hashes(entry: dict) -> None:
    """A described input (file or directory) carries the current hash of every file."""
    if "files" in entry:
        assert entry["files"], entry
        for name, described in entry["files"].items():
            assert described["sha256"] == file_sha256(Path(entry["path"]) / name), name
    else:
        assert entry["sha256"] == file_sha256(entry["path"]), entry["path"]


def test_vocab_outputs_record_inputs_and_versions(zh_sp_dir, merged_tokenizer_dir, chinese_corpus, base_tokenizer_dir):
    trained = manifest(zh_sp_dir)
    assert trained["command"] == "vocab train"
    [corpus] = trained["inputs"]["corpus"]
    assert corpus["path"] == str(chinese_corpus.resolve())
    assert_file_hashes(corpus)
    assert_versions(trained)

    merged = manifest(merged_tokenizer_dir)
    assert merged["command"] == "vocab merge"
    assert_file_hashes(merged["inputs"]["base"])
    assert merged["inputs"]["base"]["path"] == str(base_tokenizer_dir.resolve())
    [added] = merged["inputs"]["add"]
    assert_file_hashes(added)
    assert added["sha256"] == file_sha256(zh_sp_dir / "chinese_sp.model")
    assert_versions(merged)


def test_vocab_merge_from_a_model_dir_hashes_only_the_tokenizer_it_reads(tiny_model_dir, zh_sp_dir, tmp_path, monkeypatch):
    """``--base MODEL_DIR`` reads tokenizer.model alone: hashing the weights too would read the
    whole model (12.5 GiB at 7B) for a step that needs none of it; the model is named by its
    fingerprint instead, as extend names it."""
    import zhllama.provenance as provenance

    hashed = []
    real_sha256 = provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda path, *a: hashed.append(Path(path).name) or real_sha256(path, *a))
    out = tmp_path / "merged"
    ok(["vocab", "merge", "--base", tiny_model_dir, "--add", zh_sp_dir / "chinese_sp.model", "--out", out])
    base = manifest(out)["inputs"]["base"]
    assert base["path"] == str(tiny_model_dir.resolve())
    assert list(base["files"]) == ["tokenizer.model"]
    assert_file_hashes(base)
    assert base["fingerprint"] == model_fingerprint(tiny_model_dir)
    assert not [name for name in hashed if name.endswith((".safetensors", ".bin"))], hashed


def test_extend_records_base_fingerprint_and_tokenizer_hashes(chain, tiny_model_dir):
    record = manifest(chain.extended)
    assert record["command"] == "extend"
    assert record["inputs"]["model"]["fingerprint"] == model_fingerprint(tiny_model_dir)
    assert_file_hashes(record["inputs"]["tokenizer"])
    assert_versions(record)


def test_adapter_records_data_hashes_and_the_base_it_was_trained_on(chain):
    record = manifest(chain.stage1)
    assert record["command"].startswith("pretrain")
    [data] = record["inputs"]["data"]
    assert_file_hashes(data)
    assert record["chain"]["model_fingerprint"] == model_fingerprint(chain.extended)
    assert_versions(record)


def test_sft_and_merge_record_their_chain(chain, tmp_path):
    data = tiny.write_json(tmp_path / "sft.json", tiny.instruction_records(8))
    sft_out = tmp_path / "sft"
    ok([
        "sft", "--model", chain.extended, "--adapter", chain.stage1, "--data", data, "--template", "alpaca",
        "--out", sft_out, "--max-steps", "1", "--max-seq-length", "256", *TRAIN_FLAGS,
    ])  # fmt: skip
    record = manifest(sft_out)
    [described] = record["inputs"]["data"]
    assert_file_hashes(described)
    assert record["chain"]["model_fingerprint"] == model_fingerprint(chain.extended)
    assert record["chain"]["adapters"] == [str(chain.stage1.resolve())]
    assert_versions(record)

    merged = tmp_path / "merged"
    ok(["merge", "--model", chain.extended, "--adapter", chain.stage1, "--adapter", sft_out, "--out", merged])
    record = manifest(merged)
    assert record["inputs"]["model"]["fingerprint"] == model_fingerprint(chain.extended)
    for entry in record["inputs"]["adapters"]:
        assert_file_hashes(entry)
    for name, output in record["outputs"].items():
        assert output["sha256"] == file_sha256(merged / name), name
    assert_versions(record)


def test_eval_json_records_inputs_and_versions(chain, tmp_path):
    results = tmp_path / "eval.json"
    ok(["eval", "--model", chain.extended, "--adapter", chain.stage1, "--data", chain.corpus, "--block-size", "32",
        "--max-documents", "2", "--json", results])  # fmt: skip
    report = json.loads(results.read_text())
    assert report["chain"]["model_fingerprint"] == model_fingerprint(chain.extended)
    # the scores mean nothing without the text they were measured on and the code that measured
    assert "inputs" in report and "versions" in report, f"eval --json records no input hashes or versions: {sorted(report)}"
    described = report["inputs"][str(chain.corpus)]
    assert described and all(entry["sha256"] == file_sha256(entry["path"]) for entry in described)
    assert_versions(report)


def training_argv(command: str, chain, out: Path, data: Path) -> list:
    if command == "pretrain":
        return ["pretrain", "--stage", "2", "--data", chain.corpus, "--block-size", "32", "--validation-split", "0",
                "--cache-dir", out.parent / "cache", "--out", out, "--max-steps", "1", *TRAIN_FLAGS]  # fmt: skip
    return ["sft", "--data", data, "--template", "alpaca", "--out", out, "--max-steps", "1", "--max-seq-length", "256", *TRAIN_FLAGS]


COMMANDS = ("pretrain", "sft", "eval", "chat", "merge")


@pytest.mark.parametrize("command", COMMANDS)
def test_chain_on_another_base_is_refused_unless_overridden(command, chain, renamed_base, tmp_path, capsys):
    data = tiny.write_json(tmp_path / "sft.json", tiny.instruction_records(8))
    out = tmp_path / "out"
    base_args = {
        "pretrain": training_argv("pretrain", chain, out, data),
        "sft": training_argv("sft", chain, out, data),
        "eval": ["eval", "--data", chain.corpus, "--block-size", "32", "--max-documents", "2"],
        "chat": ["chat", "--raw", "--prompt", "你好", "--max-new-tokens", "2", "--seed", "0"],
        "merge": ["merge", "--out", out],
    }[command]
    argv = [*base_args, "--model", renamed_base, "--adapter", chain.stage1]
    code, err = cli(argv, capsys)
    line = error_line(code, err)
    assert f"adapter {chain.stage1} was trained on a base with fingerprint" in line and "--allow-base-mismatch" in line
    assert leftovers(out) == []

    code, err = cli([*argv, "--allow-base-mismatch"], capsys)
    assert code == 0, f"zhllama {command} --allow-base-mismatch failed: {err[-1500:]}"
    if command in ("pretrain", "sft", "merge"):
        assert manifest(out)["options"]["allow_base_mismatch"] is True  # the override is on record
