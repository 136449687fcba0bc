"""The layer-streamed forward (zhllama/layerwise.py) computes what the whole model computes,
for right-padded batches, tied or untied, and on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from zhllama.layerwise import LayerwiseModel, base_model_pass, batches_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQUENCES = [[1, 5, 17, 250, 3], [1, 9], [1, 400, 401, 402, 403, 404, 405, 406], [1, 700, 12]]


def whole_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def test_batches_are_right_padded_in_order_within_the_token_budget():
    batches = batches_of(SEQUENCES, tokens_per_batch=16)
    unpadded = []
    for batch in batches:
        for ids, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
            unpadded.append(ids[: sum(mask)])
    assert unpadded == SEQUENCES
    assert all(b.input_ids.numel() <= 16 or len(b.input_ids) == 1 for b in batches) and len(batches) > 1


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_layerwise_logits_equal_the_whole_model(tied, request):
    model_dir = request.getfixturevalue("tiny_tied_model_dir" if tied else "tiny_model_dir")
    model = whole_model(model_dir)
    batches = batches_of(SEQUENCES, tokens_per_batch=16)
    streamed = LayerwiseModel(model_dir).logits(batches)
    for batch, logits in zip(batches, streamed):
        with torch.no_grad():
            reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        real = batch.attention_mask.bool()
        torch.testing.assert_close(logits[real], reference[real], rtol=0, atol=1e-5)


def test_base_model_pass_is_the_last_hidden_state(tiny_model_dir):
    model = whole_model(tiny_model_dir)
    batches = batches_of(SEQUENCES, tokens_per_batch=12)
    for batch, states in zip(batches, base_model_pass(tiny_model_dir, batches)):
        with torch.no_grad():
            reference = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        real = batch.attention_mask.bool()
        torch.testing.assert_close(states[real], reference[real], rtol=0, atol=1e-5)


def test_each_layer_is_loaded_once_per_pass(tiny_model_dir):
    loaded = []
    model = LayerwiseModel(tiny_model_dir, edit_layer=lambda layer, index: loaded.append(index) or layer)
    model.hidden_states(batches_of(SEQUENCES, tokens_per_batch=8))
    assert loaded == list(range(model.config.num_hidden_layers))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layerwise_on_cuda_matches_cpu(tiny_model_dir):
    batches = batches_of(SEQUENCES)
    cpu = LayerwiseModel(tiny_model_dir).logits(batches)
    cuda = LayerwiseModel(tiny_model_dir, device="cuda").logits(batches)
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
