"""Plots people would rather look at than read: the training curve, base vs tuned."""

from __future__ import annotations

from pathlib import Path


def loss_curve(history: list[dict], path: str | Path, title: str = "QLoRA training") -> Path:
    """Plot train loss (and eval loss, learning rate when logged) per step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("loss", "-"), ("eval_loss", "o--")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs, strict=True), color="grey", alpha=0.4, label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def comparison_bars(base: dict, tuned: dict, keys: list[str], path: str | Path) -> Path:
    """Side-by-side bars of base vs tuned for the given metric keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3.2), dpi=100)
    for ax, key in zip(list(axes) if len(keys) > 1 else [axes], keys, strict=True):
        ax.bar(["base", "tuned"], [base[key], tuned[key]], color=["#999999", "#2b7bba"])
        ax.set_title(key.replace("_", " "))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def trial_bars(names: list[str], losses: list[float], best: int, path: str | Path) -> Path:
    """One bar per sweep trial (its eval loss), the winner highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.4), dpi=100)
    colors = ["#2b7bba" if i == best else "#999999" for i in range(len(names))]
    ax.bar(range(len(names)), losses, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("tuned eval loss")
    ax.set_title(f"sweep: best {names[best]}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
