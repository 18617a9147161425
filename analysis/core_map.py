"""TASO's core-region map for one weight matrix, from a run's ``core_regions.safetensors``.

With ``method.save_importance=true`` the full importance matrix is drawn as a heat map with
the chosen rows and columns outlined; otherwise the row and column importance profiles are
drawn with the chosen indices marked. PNG and PDF.

    python -m analysis.core_map --run <run dir> [--matrix <name>] [--out core_map]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from analysis.figures import plt, save_figure

MAP_FILE = "core_regions.safetensors"


def matrices(tensors: dict) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".rows")})


def plot_core_map(run_dir: Path, matrix: str | None, out: Path) -> list[Path]:
    tensors = load_file(str(Path(run_dir) / MAP_FILE))
    names = matrices(tensors)
    name = matrix or names[0]
    if name not in names:
        raise KeyError(f"no matrix {name!r} in {run_dir / MAP_FILE}; it holds: {', '.join(names)}")
    rows, cols = tensors[f"{name}.rows"].numpy(), tensors[f"{name}.cols"].numpy()
    row_scores, col_scores = tensors[f"{name}.row_scores"].numpy(), tensors[f"{name}.col_scores"].numpy()
    importance = tensors.get(f"{name}.importance")
    if importance is not None:
        fig, ax = plt.subplots(figsize=(7, 6))
        image = ax.imshow(importance.float().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="|W ⊙ ∂L/∂W|")
        for r in rows:
            ax.axhline(r, color="cyan", lw=0.3, alpha=0.6)
        for c in cols:
            ax.axvline(c, color="lime", lw=0.3, alpha=0.6)
        ax.set(xlabel="input column", ylabel="output row")
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5))
        for ax, scores, chosen, label in ((top, row_scores, rows, "output row"), (bottom, col_scores, cols, "input column")):
            ax.plot(scores, lw=0.8, color="0.4")
            ax.scatter(chosen, scores[chosen], s=8, color="crimson", label="core", zorder=3)
            ax.set(xlabel=label, ylabel="summed importance")
            ax.legend(loc="upper right")
    fig.suptitle(f"TASO core region: {name} ({len(rows)} rows x {len(cols)} columns)")
    fig.tight_layout()
    return save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--matrix")
    parser.add_argument("--out", type=Path, default=Path("core_map"))
    args = parser.parse_args()
    for path in plot_core_map(args.run, args.matrix, args.out):
        print(path)


if __name__ == "__main__":
    main()
