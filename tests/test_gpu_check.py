"""bench/gpu_check.sh --tiny: the GPU check's whole logic on CPU (fresh --no-deps install into a
scratch site, version report, extend --head-init logprob, stage 1, stage 2, the 4-bit refusal, SFT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def gpu_check(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_arguments_exit_non_zero():
    done = gpu_check("--no-such-flag", timeout=30)
    assert done.returncode == 2 and "unknown argument --no-such-flag" in done.stderr


@pytest.mark.slow
def test_tiny_gpu_check_runs_the_pipeline_on_cpu(tmp_path):
    done = gpu_check("--tiny", env={"OUT": str(tmp_path)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = done.stdout
    versions = next(line for line in out.splitlines() if line.startswith("versions: "))
    assert "transformers " in versions and "missing" not in versions.split("bitsandbytes")[0]
    assert "extend --head-init logprob: " in out and out.rstrip().splitlines()[-1].startswith("== gpu_check passed in ")
    assert "stage1 zhllama: acceleration: cpu" in done.stderr

    table = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["stage"]: row for row in table["rows"]}
    assert list(rows) == ["stage1", "stage2", "stage2-4bit", "sft"]
    for stage in ("stage1", "stage2", "sft"):
        assert rows[stage]["tokens_per_second"] > 0 and rows[stage]["peak_rss_mib"] > 0 and rows[stage]["steps"] == 3
    assert rows["stage2"]["trainable_params"] > rows["stage1"]["trainable_params"]  # LoRA on top of the rows
    assert rows["stage2-4bit"]["refused"].startswith("zhllama: error: --load-in-4bit needs a CUDA GPU")
    assert table["settings"]["extend_s"] > 0
