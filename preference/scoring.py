"""Pair figures computed here, outside trl: sequence log-probabilities of the answers, DPO's
implicit reward, and reward-model scores, each with its margin and pair accuracy.

DPO's implicit reward of an answer y to prompt x is ``beta * (log pi(y|x) - log pi_ref(y|x))``
(Rafailov et al. 2023, eq. 5), summed over the answer's tokens: ``zhllama dpo`` measures
``log pi_ref`` on the chain before training (the reference is that chain) and ``log pi`` on
the same model after. A pair counts as accurate when the chosen answer scores strictly higher.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch


@dataclass
class PairFigures:
    """Mean chosen and rejected score, their mean margin and the share of pairs ranked right."""

    pairs: int
    chosen: float
    rejected: float
    margin: float
    accuracy: float

    @classmethod
    def of(cls, chosen: torch.Tensor, rejected: torch.Tensor) -> "PairFigures":
        chosen, rejected = chosen.double(), rejected.double()
        return cls(
            pairs=len(chosen),
            chosen=round(chosen.mean().item(), 4),
            rejected=round(rejected.mean().item(), 4),
            margin=round((chosen - rejected).mean().item(), 4),
            accuracy=round((chosen > rejected).double().mean().item(), 4),
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return f"margin {self.margin:+.4f}, accuracy {self.accuracy:.1%} ({self.pairs} pairs)"


def _batches(rows: Sequence[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sequences])
    return ids, mask


@torch.no_grad()
def answer_logps(model, rows: Sequence[dict], *, pad_id: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and of the rejected answers given their prompt."""
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for batch in _batches(rows, batch_size):
        for key, into in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            sequences = [row["prompt_ids"] + row[key] for row in batch]
            ids, mask = _padded(sequences, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            answer = torch.zeros_like(mask)
            for i, row in enumerate(batch):
                answer[i, len(row["prompt_ids"]) : len(sequences[i])] = 1
            into.append((token_logps * answer[:, 1:]).sum(dim=1).cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def sequence_rewards(model, sequences: Sequence[list[int]], *, pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """A sequence-classification model's scalar score of each token sequence."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for batch in _batches(list(sequences), batch_size):
        ids, mask = _padded(list(batch), pad_id)
        scores.append(model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, 0].float().cpu())
    return torch.cat(scores)


def rm_figures(model, rows: Sequence[dict], *, pad_id: int, batch_size: int = 8) -> dict:
    """Reward-model figures of ``{"chosen_ids", "rejected_ids"}`` rows."""
    chosen = sequence_rewards(model, [r["chosen_ids"] for r in rows], pad_id=pad_id, batch_size=batch_size)
    rejected = sequence_rewards(model, [r["rejected_ids"] for r in rows], pad_id=pad_id, batch_size=batch_size)
    return {"reward": PairFigures.of(chosen, rejected).as_dict()}
