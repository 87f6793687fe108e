"""``dsgd layouts --plot`` for the whole step: step time against memory per device, each candidate a
point, the Pareto front (no other plan is both faster and smaller) drawn through, the recommendation
starred; the target mesh's predictions in a second panel."""
from __future__ import annotations

from typing import Sequence


def pareto_front(points: Sequence[tuple]) -> list:
    """Indices of the points (time, memory) that no other point beats on both (ties kept), by memory."""
    idx = [i for i, (t, m) in enumerate(points) if t == t and m == m]
    front = [i for i in idx if not any((points[j][0] <= points[i][0] and points[j][1] <= points[i][1])
                                       and (points[j][0] < points[i][0] or points[j][1] < points[i][1]) for j in idx)]
    return sorted(front, key=lambda i: points[i][1])


def plot(advice, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("measured here", advice.table, "step_ms", f"{advice.devices} devices")]
    if advice.target is not None:
        panels.append(("predicted", advice.target, "pred_ms", advice.target_mesh))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (kind, df, col, where) in zip(axes[0], panels):
        ok = df[df[col].notna()]
        pts = [(float(t), float(m) / 2**20) for t, m in zip(ok[col], ok["mem_bytes"])]
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], s=40, zorder=3, label="candidate plans")
        for (t, m), name in zip(pts, ok["plan"]):
            ax.annotate(name, (m, t), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(pts)
        if front:
            ax.plot([pts[i][1] for i in front], [pts[i][0] for i in front], "-", color="tab:green", lw=1.2,
                    zorder=2, label="Pareto front")
        rec = ok[ok["recommended"]]
        if len(rec):
            ax.scatter(rec["mem_bytes"] / 2**20, rec[col], marker="*", s=320, color="gold", edgecolors="k",
                       zorder=4, label=f"recommended: {rec['plan'].iloc[0]}")
        ax.set_xlabel("memory per device (MiB): params + slots + the step's transient peak")
        ax.set_ylabel("whole training step (ms)")
        ax.set_title(f"{advice.model} on {where} ({kind})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot", "pareto_front"]
