"""Comparing two commits' asv results: each benchmark and parameter set classified (regression,
faster, slower?, ...: see :func:`compare`) by the ratio of the medians and asv's statistics, the
gate's exit status (:func:`verdict`), and the ABBA round check."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_ASV_FAILED, EXIT_INTERNAL = 0, 1, 2, 3, 4

DEFAULT_FACTOR = 1.1
DEFAULT_P = 0.002  # asv's own threshold
# Higher is better for these (by benchmark name); lower is better for everything else.
DEFAULT_HIGHER_IS_BETTER = r"(gbps|roofline_fraction|throughput|speedup)$"
# track_ benchmarks that are exact counts: compared by value and factor, no statistics needed.
DEFAULT_DETERMINISTIC = r"(state_bytes_per_device|bytes_per_device)$"
STATUS_ORDER = ["regression", "new failure", "slower?", "faster", "fixed", "faster?", "same", "incomparable",
                "skipped", "failed", "only in base", "only in head"]


@dataclass
class Policy:
    factor: float = DEFAULT_FACTOR
    p_threshold: float = DEFAULT_P
    higher_is_better: str = DEFAULT_HIGHER_IS_BETTER
    deterministic: str = DEFAULT_DETERMINISTIC
    allow_new_failures: bool = False
    criterion: str = "strict"  # "strict": samples differ AND the 99% CIs are apart; "asv": asv's test alone


def _has_stats(stats) -> bool:
    return isinstance(stats, dict) and "ci_99_a" in stats and "ci_99_b" in stats


def significant(a_stats, a_samples, b_stats, b_samples, p_threshold: float) -> Optional[bool]:
    """asv's test: Mann-Whitney U on the samples, else non-overlapping 99% CIs.  None: no stats
    (a track_), or one sample on a side (a --quick run): nothing to test with."""
    from asv import _stats

    a_samples = list(a_samples) if isinstance(a_samples, (list, tuple)) else None
    b_samples = list(b_samples) if isinstance(b_samples, (list, tuple)) else None
    if not (_has_stats(a_stats) and _has_stats(b_stats)):
        return None
    if a_stats.get("repeat", 0) == 1 and not a_samples or b_stats.get("repeat", 0) == 1 and not b_samples:
        return None
    if (a_samples and len(a_samples) < 2) or (b_samples and len(b_samples) < 2):
        return None
    return bool(_stats.is_different(a_samples or None, b_samples or None, a_stats, b_stats, p_threshold=p_threshold))


def ci_apart(a_stats, b_stats) -> Optional[bool]:
    """Whether the 99% confidence intervals of the two medians do not overlap (None: no CIs)."""
    if not (_has_stats(a_stats) and _has_stats(b_stats)):
        return None
    vals = [a_stats["ci_99_a"], a_stats["ci_99_b"], b_stats["ci_99_a"], b_stats["ci_99_b"]]
    if any(isnull(v) or math.isinf(v) for v in vals):
        return None
    return vals[1] < vals[2] or vals[3] < vals[0]


def compare(base, head, policy: Policy = Policy()):
    """Join two commits' frames and classify each (benchmark, params, env) pair.

    ``ratio`` is head / base; ``worse_ratio`` is the ratio oriented so that > 1 is worse.
    ``status``: regression / faster (confirmed), slower? / faster? (beyond the factor, not
    confirmed), same, new failure, fixed, failed, skipped, incomparable (benchmark code
    changed between the commits), only in base / only in head.
    """
    import pandas as pd

    key = ["benchmark", "params", "env"]
    if set(base["env"]) != set(head["env"]) and base["env"].nunique() == 1 and head["env"].nunique() == 1:
        # e.g. one commit measured with --python=same, the other in asv's virtualenv
        head = head.assign(env=base["env"].iloc[0])
    m = base.merge(head, on=key, how="outer", suffixes=("_base", "_head"), indicator="merge_")
    hib = re.compile(policy.higher_is_better) if policy.higher_is_better else None
    det = re.compile(policy.deterministic) if policy.deterministic else None
    rows = []
    for r in m.itertuples(index=False):
        r = r._asdict()
        b = None if _true(r["failed_base"]) else float(r["value_base"])
        h = None if _true(r["failed_head"]) else float(r["value_head"])
        ratio = worse = math.nan
        higher_better = bool(hib and hib.search(r["benchmark"]))
        sig = None
        both = r["merge_"] == "both"
        if not both:
            status = "only in base" if r["merge_"] == "left_only" else "only in head"
        elif (r["version_base"] and r["version_head"] and r["version_base"] != r["version_head"]):
            status = "incomparable"
        elif b is not None and not _isnan(b) and h is None:
            status = "new failure"
        elif b is None and h is not None and not _isnan(h):
            status = "fixed"
        elif b is None and h is None:
            status = "failed"
        elif _isnan(b) or _isnan(h):
            status = "skipped"
        else:
            ratio = h / b if b else (math.inf if h else 1.0)
            worse = (1 / ratio if ratio else math.inf) if higher_better else ratio
            sig = significant(r["stats_base"], r["samples_base"], r["stats_head"], r["samples_head"],
                              policy.p_threshold)
            if sig and policy.criterion == "strict" and ci_apart(r["stats_base"], r["stats_head"]) is False:
                # Samples of one run are correlated (the machine's load drifts between runs): a
                # rank test alone then calls a shift of the whole run "significant".  Confirmed
                # means asv's test and the medians' 99% confidence intervals agree.
                sig = False
            if sig is None and det and det.search(r["benchmark"]):
                sig = True  # exact counts: the value is the measurement
            beyond_worse = worse > policy.factor
            beyond_better = worse < 1 / policy.factor
            if beyond_worse:
                status = "regression" if sig else "slower?"
            elif beyond_better:
                status = "faster" if sig else "faster?"
            else:
                status = "same"
        rows.append(dict(
            benchmark=r["benchmark"], params=r["params"], env=r["env"],
            type=r["type_base"] if both or r["merge_"] == "left_only" else r["type_head"],
            unit=r["unit_base"] if isinstance(r["unit_base"], str) else r["unit_head"],
            base=b, head=h,
            base_err=_err(r["stats_base"]), head_err=_err(r["stats_head"]),
            n_base=_n(r["samples_base"], r["stats_base"]), n_head=_n(r["samples_head"], r["stats_head"]),
            ratio=ratio, worse_ratio=worse, higher_is_better=higher_better,
            significant=sig, status=status,
            commit_base=r["commit_base"], commit_head=r["commit_head"],
            param_dict=r["param_dict_base"] if isinstance(r["param_dict_base"], dict) else r["param_dict_head"]))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_order"] = df["status"].map({s: i for i, s in enumerate(STATUS_ORDER)})
    df = df.sort_values(["_order", "worse_ratio", "benchmark", "params"], ascending=[True, False, True, True],
                        na_position="last").drop(columns="_order").reset_index(drop=True)
    return df


def _true(v) -> bool:
    return not isnull(v) and bool(v)


def isnull(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _err(stats):
    if _has_stats(stats) and "q_25" in stats and "q_75" in stats:
        err = (stats["q_75"] - stats["q_25"]) / 2  # asv_runner.statistics.get_err
        return None if isnull(err) else err
    return None


def _n(samples, stats):
    if isinstance(samples, (list, tuple)) and samples:
        return len(samples)
    if isinstance(stats, dict) and stats.get("repeat"):
        return int(stats["repeat"])
    return 0


def verdict(df, policy: Policy = Policy()) -> int:
    if df is None or df.empty:
        return EXIT_OK
    bad = {"regression"} | (set() if policy.allow_new_failures else {"new failure"})
    return EXIT_REGRESSION if df["status"].isin(bad).any() else EXIT_OK


def round_medians(samples, counts) -> list:
    """Medians of the samples each round added (``counts``: sample count after each round)."""
    import statistics

    out, prev = [], 0
    for n in counts:
        chunk = [x for x in samples[prev:n] if not isnull(x)]
        if chunk:
            out.append(statistics.median(chunk))
        prev = max(prev, n)
    return out


def apply_round_check(df, base_frame, head_frame, rounds) -> None:
    """ABBA runs: a confirmed change must also separate the rounds — every round (process) of
    the worse commit beyond every round of the other.  Samples within one process share its
    fate (memory placement, threads, the load at that moment); the rounds are the independent
    repetitions, so an effect that only some processes show is noise, however many samples."""
    if df.empty:
        return
    base_b, head_b = rounds
    samples = {}
    for name, frame in (("base", base_frame), ("head", head_frame)):
        for r in frame.itertuples(index=False):
            samples[(name, r.benchmark, r.params)] = (r.samples if isinstance(r.samples, list) else [], r.env)
    apart_col = []
    for i, r in df.iterrows():
        sb, env_b = samples.get(("base", r["benchmark"], r["params"]), ([], None))
        sh, env_h = samples.get(("head", r["benchmark"], r["params"]), ([], None))
        mb = round_medians(sb, base_b.get((r["benchmark"], r["params"], env_b), []))
        mh = round_medians(sh, head_b.get((r["benchmark"], r["params"], env_h), []))
        apart = None
        if len(mb) >= 2 and len(mh) >= 2:
            apart = min(mh) > max(mb) or max(mh) < min(mb)
        apart_col.append(apart)
        if r["status"] in ("regression", "faster") and apart is False:
            df.at[i, "status"] = "slower?" if r["status"] == "regression" else "faster?"
            df.at[i, "significant"] = False
    df["rounds_apart"] = apart_col
