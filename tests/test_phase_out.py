"""The recovery's phase-out of the special scale: all norms together, or block by block from the embedding up."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import VOCAB, make_tiny, run_main
from normgrowth.errors import NormgrowthError
from normgrowth.zoo import batch_stream
from normgrowth.zoo.ln_removal import FrozenLayerNorm, block_phase, remove_layernorm, site_blocks
from normgrowth.zoo.twin import TwinSettings, recipe_text

SEP = 0
N_LAYERS = 2


def test_block_phase_hand_computed_values():
    """Three blocks (two layers and the final norm), window 2: the schedule runs over 3 - 1 + 2 = 4 units of
    fraction * 4; block b rises from 0 to 1 while that goes from b to b + 2."""
    expected = {0.25: [0.5, 0.0, 0.0], 0.5: [1.0, 0.5, 0.0], 0.75: [1.0, 1.0, 0.5], 1.0: [1.0, 1.0, 1.0]}
    for fraction, phases in expected.items():
        assert [block_phase(fraction, b, 3, 2.0) for b in range(3)] == pytest.approx(phases)
    assert [block_phase(0.3, b, 3, None) for b in range(3)] == [0.3, 0.3, 0.3]  # all together


@pytest.mark.parametrize("window", [0.5, 1.0, 4.0, 40.0])
def test_block_phase_is_ordered_and_ends_at_one(window):
    """Every block's phase rises with the fraction, a lower block is never behind a higher one, at most
    about ``window`` + 1 blocks are strictly between 0 and 1, and every phase is 1 at fraction 1."""
    n_blocks = 31
    fractions = [s / 100 for s in range(1, 101)]
    grid = [[block_phase(f, b, n_blocks, window) for b in range(n_blocks)] for f in fractions]
    for row in grid:
        assert all(0.0 <= p <= 1.0 for p in row)
        assert all(row[b] >= row[b + 1] for b in range(n_blocks - 1))
        assert sum(0.0 < p < 1.0 for p in row) <= math.ceil(window) + 1
    for b in range(n_blocks):
        column = [row[b] for row in grid]
        assert all(x <= y for x, y in zip(column, column[1:]))
    assert grid[-1] == [1.0] * n_blocks


def test_site_blocks_of_a_llama():
    model = make_tiny("llama", n_layers=N_LAYERS)
    blocks = site_blocks(model)
    assert blocks == {"layers.0.post_attention_layernorm": 0, "layers.1.post_attention_layernorm": 1,
                      "layers.0.input_layernorm": 0, "layers.1.input_layernorm": 1, "norm": 2}


def _rows(n: int, seed: int, n_ctx: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, VOCAB, (n, n_ctx), generator=gen)
    rows[:, 0] = SEP
    return rows


def _phases_seen(window: float) -> list[dict[str, float]]:
    """Run a removal on a tiny Llama and return, for every recovery step, the phase each frozen norm had in that
    step's forward pass (read by a hook on the modules themselves)."""
    settings = TwinSettings.tiny(steps_per_norm=1, recovery_steps=6, phase_window=window)
    model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=True)
    seen: list[dict[str, float]] = []
    current: dict[str, float] = {}

    def on_site(k: int, site: str, m: torch.nn.Module) -> None:
        if k == 2 * N_LAYERS:  # every norm is frozen: hook them all for the recovery
            for name, module in m.model.named_modules():
                if isinstance(module, FrozenLayerNorm):
                    module.register_forward_pre_hook(
                        lambda mod, args, name=name: current.__setitem__(name, float(mod.phase))
                        if torch.is_grad_enabled() else None)
            m.register_forward_hook(lambda mod, args, out: seen.append(dict(current)) if torch.is_grad_enabled()
                                    and current else None)

    remove_layernorm(model, batch_stream(_rows(64, 1, settings.n_ctx), settings.batch_size, 0), settings.removal,
                     special_id=SEP, on_site=on_site)
    assert all(float(m.phase) == 1.0 for m in model.modules() if isinstance(m, FrozenLayerNorm))
    return seen


def test_recovery_phases_out_block_by_block_from_the_embedding_up():
    """Window 1 on 2 layers + final norm (3 blocks, 3 units of schedule over 6 steps): step s has fraction
    s / 6; block b's phase is clip(fraction * 3 - b, 0, 1): at step 1 only block 0 has started (0.5), at step
    2 block 0 is done and block 1 not started, ... , at step 6 all three are 1."""
    seen = _phases_seen(1.0)
    assert len(seen) == 6
    order = ["layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.1.input_layernorm",
             "layers.1.post_attention_layernorm", "norm"]
    table = [[step[name] for name in order] for step in seen]
    assert table == [pytest.approx(row) for row in [[0.5, 0.5, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0.5, 0.5, 0],
                                                    [1, 1, 1, 1, 0], [1, 1, 1, 1, 0.5], [1, 1, 1, 1, 1]]]


def test_recovery_with_window_zero_phases_every_norm_together():
    seen = _phases_seen(0.0)
    assert [sorted(set(step.values())) for step in seen] == [[pytest.approx(s / 6)] for s in range(1, 7)]


def test_phase_window_in_settings_and_recipe():
    assert TwinSettings.reduced().removal.phase_window == 4.0
    assert TwinSettings.reduced(phase_window=0.0).removal.phase_window is None
    assert "block by block" in recipe_text(TwinSettings.reduced(), 61)["special_scale"]
    assert "every norm together" in recipe_text(TwinSettings.reduced(phase_window=0.0), 61)["special_scale"]
    with pytest.raises(NormgrowthError, match="--phase-window must be a number of blocks >= 0"):
        TwinSettings.tiny(phase_window=-1.0).validate()


def test_cli_refuses_a_negative_phase_window_in_one_line(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "zoo", "twin", str(tmp_path / "missing"), "--out",
                              str(tmp_path / "out"), "--phase-window", "-2")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "--phase-window must be a number of blocks >= 0" in err
    assert not (tmp_path / "out").exists()
