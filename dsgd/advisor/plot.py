"""``dsgd layouts --plot``: step time against bytes per device, measured and predicted."""
from __future__ import annotations

from dsgd.advisor.advice import Advice


def plot(advice: Advice, path: str) -> None:
    """Step time vs bytes per device for every candidate plan; the recommendation starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured", advice.local, advice.mesh, "step_ms", "reference_ms")]
    if advice.target is not None:
        panels.append(("predicted", advice.target, advice.target_mesh, "predicted_ms", "reference_predicted_ms"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (kind, df, mesh, tcol, rcol) in zip(axes[0], panels):
        x = df["bytes_per_device"] / 2**20
        ax.scatter(x, df[tcol], s=40, label=f"dsgd {advice.implementation}", zorder=3)
        if rcol in df and df[rcol].notna().any():
            ax.scatter(x, df[rcol], s=40, marker="s", facecolors="none", edgecolors="tab:red",
                       label="tf_keras reference", zorder=2)
            for xi, a, b in zip(x, df[tcol], df[rcol]):
                if a == a and b == b:
                    ax.plot([xi, xi], [a, b], color="0.8", lw=0.8, zorder=1)
        for xi, yi, name in zip(x, df[tcol], df["plan"]):
            if yi == yi:
                ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        rec = df[df["recommended"]]
        if len(rec):
            ax.scatter(rec["bytes_per_device"] / 2**20, rec[tcol], marker="*", s=320, color="gold",
                       edgecolors="k", label=f"recommended: {rec['plan'].iloc[0]}", zorder=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("params + optimizer state per device (MiB, log)")
        ax.set_ylabel("optimizer step (ms, log)")
        ax.set_title(f"{advice.model} on {mesh} ({kind})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
