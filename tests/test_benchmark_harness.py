"""--harness: lm-evaluation-harness (its HFLM, its encoding, batching and truncation) scoring
zhllama's CMMLU prompts gives the same per-question predictions and log-likelihoods as
zhllama's own scorer. Runs when lm-eval is installed (pip install 'lm-eval==0.4.13')."""

from __future__ import annotations

import pytest

from zhllama.evaluate import EvalOptions, evaluate_chain

pytestmark = [pytest.mark.real_assets, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_harness_backend_gives_the_same_predictions(assets, tiny_model_dir):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'lm-eval==0.4.13'")
    settings = dict(model=tiny_model_dir, benchmark="cmmlu", benchmark_dir=assets / "benchmarks" / "cmmlu",
                    subjects=["anatomy", "world_history"], limit=4, batch_size=3)  # fmt: skip
    ours = evaluate_chain(EvalOptions(**settings)).benchmark
    theirs = evaluate_chain(EvalOptions(**settings, harness=True)).benchmark
    assert (ours.scorer, theirs.scorer) == ("zhllama", "lm-evaluation-harness")
    assert [(p.subject, p.index, p.prediction) for p in ours.predictions] == [(p.subject, p.index, p.prediction) for p in theirs.predictions]
    for mine, harness in zip(ours.predictions, theirs.predictions):
        assert mine.logprobs == pytest.approx(harness.logprobs, abs=1e-3)
    # world_history's prompts lose shots to fit the tiny model's context: both score the same prompts
    assert sum(s.shots_dropped for s in ours.subjects) > 0
