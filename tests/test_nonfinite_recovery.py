"""Non-finite recovery steps (skipped, mirrored by the control) and held-out rows on which the twin runs away."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import VOCAB, make_tiny
from normgrowth.errors import TrainingDiverged
from normgrowth.zoo.train import train_steps
from normgrowth.zoo.twin import TwinSettings, run_twin

SEP = 0
N_LAYERS = 2
POISON = 7  # a batch holding this token has an infinite loss in _Quadratic


class _Quadratic(nn.Module):
    """loss = (w - 2)^2, infinite for a batch that holds POISON."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, batch: torch.Tensor, labels=None) -> SimpleNamespace:
        loss = (self.w - 2.0) ** 2
        return SimpleNamespace(loss=loss * float("inf") if bool((batch == POISON).any()) else loss)


def _run(batches: list[int], **kwargs) -> tuple[list[float], list[int], list[float]]:
    """Train on one-token batches; return w after every step, the skipped steps and the losses."""
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weights: list[float] = []
    skipped: list[int] = []
    losses: list[float] = []
    train_steps(model, opt, iter([torch.tensor([b]) for b in batches]), len(batches), lambda s: 0.1,
                on_step=lambda n: weights.append(model.w.item()), skipped=skipped, losses=losses, **kwargs)
    return weights, skipped, losses


def test_non_finite_steps_are_skipped_up_to_the_limit():
    """Gradient-norm clip 1 and lr 0.1: every finite step moves w by 0.1 towards 2; a skipped step leaves it."""
    weights, skipped, losses = _run([1, POISON, 1, POISON, 1], max_skipped=2)
    assert skipped == [2, 4]
    assert weights == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3])
    assert losses[1] == float("inf") and losses[0] == pytest.approx(4.0)
    with pytest.raises(TrainingDiverged, match="at step 4 of 5"):
        _run([1, POISON, 1, POISON, 1], max_skipped=1)
    with pytest.raises(TrainingDiverged, match="at step 2 of 5"):
        _run([1, POISON, 1, POISON, 1])  # the default: nothing skipped


def test_mirrored_steps_draw_their_batch_but_make_no_update():
    weights, skipped, losses = _run([1, 1, 1], skip_steps={2})
    assert skipped == [2] and weights == pytest.approx([0.1, 0.1, 0.2])
    assert losses == pytest.approx([4.0, 3.61, 3.61])  # step 2's loss is still computed (w = 0.1)


def _rows(n: int, seed: int, n_ctx: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, VOCAB, (n, n_ctx), generator=gen)
    rows[:, 0] = SEP
    return rows


PLANTED = 5  # token whose input embedding is planted ~1e15 times too large


def _planted_twin(settings: TwinSettings) -> tuple[dict, torch.Tensor]:
    """A tiny Llama (untied: the planted row must not reach the logits) whose token PLANTED has a huge input
    embedding. PLANTED is absent from the training rows and sits at position 5 of held-out row 2 only: norms
    that divide by the token's own scale (the control; the twin until its recovery) keep it finite, the
    norm-free twin overflows on that row."""
    model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[PLANTED] *= 1e15
    train = _rows(24, 1, settings.n_ctx)
    train[train == PLANTED] = PLANTED + 1
    held = _rows(4, 2, settings.n_ctx)
    held[held == PLANTED] = PLANTED + 1
    held[2, 5] = PLANTED
    return run_twin(model, train, held, settings, SEP), held


def test_rows_where_the_twin_runs_away_are_left_out_and_located():
    settings = TwinSettings.tiny(steps_per_norm=1, recovery_steps=2)
    result, held = _planted_twin(settings)
    record = result["record"]
    assert record["twin_built"] is True
    rows = record["heldout_rows"]
    assert rows["n"] == 4 and rows["kept"] == [0, 1, 3]
    (runaway,) = rows["excluded"]
    assert runaway["row"] == 2 and runaway["site"] == "layers.0.input_layernorm" and runaway["block"] == 0
    assert runaway["position"] == 5 and runaway["token_id"] == PLANTED
    assert torch.equal(result["heldout_kept"], held[[0, 1, 3]])
    # twin and control are summarised on the kept rows; the control also on all of them, where it is finite
    assert len(record["twin"]["heldout_loss_per_row"]) == 3
    all_rows = record["control_all_rows"]["heldout_loss_per_row"]
    assert len(all_rows) == 4 and all(v == v and abs(v) < 1e3 for v in all_rows)
    assert record["control"]["heldout_loss_per_row"] == [all_rows[i] for i in (0, 1, 3)]


def test_too_few_finite_rows_fail_the_twin():
    settings = TwinSettings.tiny(steps_per_norm=1, recovery_steps=2, min_finite_rows=1.0)
    result, _ = _planted_twin(settings)
    record = result["record"]
    assert result["twin"] is None and record["twin_built"] is False
    assert record["diverged"]["reason"] == "the finished model is finite on 3 of 4 held-out rows (needs 1 of them)"
    assert record["schedule"]["compared"] == "the steps before the recovery"


def test_the_control_makes_no_update_where_the_twin_skipped(monkeypatch):
    """The twin's penalty is made infinite at its second recovery step (planted): that step is skipped, recorded,
    and handed to the control's recovery as a step without update."""
    from normgrowth.zoo import ln_removal

    real = ln_removal.train_steps
    seen = {}

    def planted(model, opt, batches, n_steps, lr_at, progress=None, label="", *args, **kwargs):
        if label == "norm-free recovery":
            penalty, calls = kwargs["penalty"], []

            def poisoned() -> torch.Tensor:
                calls.append(1)
                value = penalty()
                return value * float("inf") if len(calls) == 2 else value
            kwargs["penalty"] = poisoned
        seen[label] = set(kwargs.get("skip_steps", ()))
        return real(model, opt, batches, n_steps, lr_at, progress, label, *args, **kwargs)

    monkeypatch.setattr(ln_removal, "train_steps", planted)
    settings = TwinSettings.tiny(steps_per_norm=1, recovery_steps=4)
    model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=True).eval()
    record = run_twin(model, _rows(24, 1, settings.n_ctx), _rows(4, 2, settings.n_ctx), settings, SEP)["record"]
    assert record["twin_built"] is True and record["recovery_skipped_steps"] == [2]
    assert seen["control recovery"] == {2} and seen["norm-free recovery"] == set()
    assert math.isfinite(record["recovery_trace"][1][2])  # the next-token loss of the skipped step is recorded
