"""Figure 7: with LayerNorm vs without: norm growth and deletion side by side for one model pair.

Drawn from R/compare.json (``normgrowth compare A B --json``) through the library's one comparison
figure, :func:`normgrowth.compare.draw_comparison`: (a) mean ||resid_post|| per layer of both models (log
axis) with their fitted exponentials (bands); (b) growth factor per layer with 95 % CI for every site of
both, and the difference g_A - g_B with the 95 % CI computed by ``compare`` (a paired bootstrap over the
sequences when both models saw the same token batch, independent bootstraps otherwise; the panel says which); (c) retention and (d) dilution against distance for both, with 95 % CI bands and
each model's deletion verdict.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import PAGE_WIDTH, MissingInput, cli, new_figure, read_json, run_figure, save

STEM = "fig_compare"


def draw(results_dir: Path, out_dir: Path) -> list[Path]:
    from normgrowth.compare import draw_comparison

    doc = read_json(results_dir / "compare.json")
    if not doc or not doc.get("curves") or not doc.get("growth"):
        raise MissingInput(f"no compare.json with curves in {results_dir}: run `normgrowth compare A B --json`")
    fig = new_figure(PAGE_WIDTH + 1, 8.4)
    draw_comparison(fig, doc)
    return save(fig, out_dir, STEM)


def main(results_dir: str | Path = "results", out_dir: str | Path = "figures") -> list[Path]:
    return run_figure(STEM, draw, results_dir, out_dir)


if __name__ == "__main__":
    cli(main, __doc__.splitlines()[0], sys.argv[1:])
