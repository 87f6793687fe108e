"""``dsgd regress``' report: the comparison as a terminal table, Markdown or CSV, and its one-line
summary."""
from __future__ import annotations

import math
from pathlib import Path

from dsgd.harness.regress_compare import STATUS_ORDER, Policy, isnull, verdict

REPORT_COLUMNS = ["status", "benchmark", "params", "base", "head", "ratio", "significant", "n_base", "n_head"]


def _fmt_value(v, unit, err=None) -> str:
    from asv.util import human_value

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "failed" if v is None else "n/a"
    err = None if isnull(err) else err
    if unit in ("seconds", "bytes"):
        return human_value(v, unit, err=err)
    s = f"{v:.4g}"
    return s + (f"±{err:.2g}" if err else "")


def table_frame(df, changed_only: bool = False):
    """The report as display strings (what the terminal and Markdown show): every row but the
    skipped ones (counted in the summary; the CSV has them all), or only the changed ones."""
    import pandas as pd

    if df.empty:
        return pd.DataFrame(columns=REPORT_COLUMNS)
    hide = ["same", "skipped", "failed"] if changed_only else ["skipped"]
    view = df[~df["status"].isin(hide)]
    out = pd.DataFrame({
        "status": view["status"],
        "benchmark": view["benchmark"],
        "params": view["params"].fillna(""),
        "base": [_fmt_value(v, u, e) for v, u, e in zip(view["base"], view["unit"], view["base_err"])],
        "head": [_fmt_value(v, u, e) for v, u, e in zip(view["head"], view["unit"], view["head_err"])],
        "ratio": [("n/a" if isnull(x) else f"{x:.2f}") for x in view["ratio"]],
        "significant": view["significant"].map({True: "yes", False: "no"}).fillna("-"),
        "n_base": view["n_base"], "n_head": view["n_head"],
    })
    if "rounds_apart" in view:
        out["rounds apart"] = view["rounds_apart"].map({True: "yes", False: "no"}).fillna("-")
    return out.reset_index(drop=True)


def summary(df, policy: Policy) -> str:
    if df.empty:
        return "no benchmarks in common"
    counts = df["status"].value_counts()
    parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if s in counts]
    pairs = df[["commit_head", "commit_base"]].dropna().drop_duplicates()
    if len(pairs) == 1:
        which = f"{pairs.iloc[0, 0][:8]} vs {pairs.iloc[0, 1][:8]}"
    else:
        which = f"{len(pairs)} commits, each vs its parent"
    v = verdict(df, policy)
    word = "REGRESSION" if v else "no confirmed regression"
    return (f"{which}: {word} (factor {policy.factor:g}, p < {policy.p_threshold:g}): " + ", ".join(parts))


def render(df, fmt: str, policy: Policy, changed_only: bool = False) -> str:
    if fmt == "csv":
        cols = [c for c in df.columns if c != "param_dict"]
        flat = df[cols].copy() if not df.empty else df
        if not df.empty:
            params = df["param_dict"].apply(lambda d: d if isinstance(d, dict) else {})
            names = sorted({k for d in params for k in d})
            for n in names:
                flat[f"param:{n}"] = params.apply(lambda d, n=n: d.get(n))
        return flat.to_csv(index=False)
    view = table_frame(df, changed_only)
    if fmt == "markdown":
        head = f"### asv regression report\n\n{summary(df, policy)}\n\n"
        if view.empty:
            return head + "_nothing changed beyond the factor_\n"
        return head + _markdown(view) + "\n"
    text = view.to_string(index=False) if not view.empty else "(no rows)"
    return text + "\n\n" + summary(df, policy) + "\n"


def _markdown(view) -> str:
    try:
        return view.to_markdown(index=False)
    except ImportError:  # tabulate missing: a plain pipe table
        cols = list(view.columns)
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in view.itertuples(index=False):
            lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |")
        return "\n".join(lines)


def write_outputs(df, args, policy: Policy) -> None:
    print(render(df, args.format, policy, changed_only=args.only_changed), end="")
    if args.markdown:
        Path(args.markdown).write_text(render(df, "markdown", policy, changed_only=args.only_changed))
    if args.csv:
        Path(args.csv).write_text(render(df, "csv", policy))
