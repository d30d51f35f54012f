"""The domain x expert routing matrix as a PNG (matplotlib, no display needed), written atomically."""

from __future__ import annotations

from pathlib import Path


def heatmap(matrix: dict, path: Path, title: str) -> Path:
    """The domain x expert matrix as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix["all_layers"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(values[0]), 1.0 + 0.6 * len(values)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(values[0])), [f"expert {e}" for e in range(len(values[0]))])
    ax.set_yticks(range(len(values)), matrix["domains"])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


