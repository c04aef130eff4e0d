"""The report's extra fits (median, geometric mean, position groups) against plain-HF computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tiny, hf_model


@pytest.fixture(scope="module")
def deep_gpt2(tmp_path_factory):
    return build_tiny("gpt2", tmp_path_factory.mktemp("deep") / "gpt2", seed=3, n_layers=6)


def test_variant_fits_equal_plain_hf_curves(deep_gpt2):
    import normgrowth as ng
    from normgrowth.report import position_groups, variant_fits

    ids = torch.as_tensor(np.random.RandomState(1).randint(1, 100, size=(9, 12)))
    ids[:, 0] = 0
    model = ng.load_model(str(deep_gpt2), device="cpu")
    res = ng.collect(model, ids, batch_size=4)
    fits = variant_fits(res, window="1:4")

    with torch.no_grad():  # resid_post[l] = hidden_states[l + 1] for l < n-1 (the last one is after ln_f)
        hs = hf_model(deep_gpt2)(ids, output_hidden_states=True).hidden_states
    norms = torch.stack([h.norm(dim=-1) for h in hs[1:6]]).double().numpy()  # [5 layers, seq, pos], layers 0..4
    groups = position_groups(res.position_count)
    assert groups == {"early": (1, 4), "middle": (5, 8), "late": (9, 11)}  # positions 1..11 in thirds
    for name, (lo, hi) in groups.items():
        curve = norms[:, :, lo:hi + 1].mean(axis=(1, 2))  # every sequence has every position
        slope = np.polyfit(np.arange(1, 5), np.log(curve[1:5]), 1)[0]
        assert fits["resid_post"]["positions"][name]["growth_factor"] == pytest.approx(np.exp(slope), rel=1e-5)
        assert fits["resid_post"]["positions"][name]["positions"] == [lo, hi]
    geo = np.exp(np.log(norms[:, :, 1:]).mean(axis=(1, 2)))
    slope = np.polyfit(np.arange(1, 5), np.log(geo[1:5]), 1)[0]
    assert fits["resid_post"]["geometric_mean"]["growth_factor"] == pytest.approx(np.exp(slope), rel=1e-5)
    med = np.median(norms[:, :, 1:].reshape(5, -1), axis=1)  # the collector's median is from 0.58 % bins
    slope = np.polyfit(np.arange(1, 5), np.log(med[1:5]), 1)[0]
    assert fits["resid_post"]["median"]["growth_factor"] == pytest.approx(np.exp(slope), rel=5e-3)


def test_report_fits_carry_model_free_numbers_and_the_law_block(deep_gpt2):
    import normgrowth as ng
    from normgrowth.report import format_report_table, report_document

    ids = torch.as_tensor(np.random.RandomState(2).randint(1, 100, size=(8, 10)))
    res = ng.collect(ng.load_model(str(deep_gpt2), device="cpu"), ids, batch_size=4)
    doc = report_document(res, window="1:4")
    for site, fit in doc["fit"].items():
        mean = np.asarray(res.sites[site].mean, dtype=np.float64)  # the collector's token mean curve
        lm = np.log(mean)
        interior = [(lm[i + 1] - lm[i - 1]) / 2 for i in range(1, lm.size - 1)]
        np.testing.assert_allclose(fit["local_slope"]["slope"][1:-1], interior, rtol=1e-5, atol=1e-6)
        assert fit["mean_log_slope"] == pytest.approx((lm[4] - lm[1]) / 3, rel=1e-5)
        assert fit["ratio_last_first"] == pytest.approx(mean[-1] / mean[0], rel=1e-5)
        assert fit["window_sensitivity"]["n_windows"] == 0  # 6 layers: no window of 5 inside layers 1..4
        assert {"best", "rejected", "laws"} <= set(fit["law"])
    assert format_report_table(res).splitlines()[3].split()[0] == "layer"


def test_collected_statistics_import_no_estimator():
    """Layering: the collector and everything it imports (transitively, inside the package) import no estimator."""
    import ast
    from pathlib import Path

    import normgrowth

    root = Path(normgrowth.__file__).parent
    estimators = {"fit", "laws", "report", "compare", "sweep", "weights", "pipeline", "cli"}

    def imports(module: str) -> set[str]:
        path = root / f"{module}.py"
        if not path.exists():
            return set()
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.add((node.module or "").split(".")[0] or next(a.name for a in node.names))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normgrowth."):
                found.add(node.module.split(".")[1])
        return found

    seen, todo = set(), ["collector"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(imports(mod))
    assert "results" in seen and not (seen & estimators), sorted(seen & estimators)
