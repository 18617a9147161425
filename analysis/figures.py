"""Matplotlib on the Agg backend (no display needed) and saving a figure as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save_figure(fig: Figure, out: Path) -> list[Path]:
    """Write ``out.png`` and ``out.pdf``, close the figure, return the paths."""
    written = []
    for suffix in (".png", ".pdf"):
        path = Path(out).with_suffix(suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
        written.append(path)
    plt.close(fig)
    return written
