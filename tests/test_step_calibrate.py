"""The step model's microbenchmark statistics (dsgd.advisor.step_calibrate): pooled trimmed means, the
relative-error alpha-beta fit, and the measured ranking's own repeatability (step_advice)."""
import numpy as np
import pytest

from dsgd.advisor import step_calibrate as sc
from dsgd.advisor.step_advice import split_half_spearman


def _round(rng, small_ms: float, call_ms: float = 0.7, reps: int = 9) -> dict:
    """One round's calls (seconds): a collective of alpha + beta x bytes on top of the trivial call."""
    def calls(ms, n):
        return list((call_ms + ms + rng.normal(0, 0.01, n)) * 1e-3)

    single = [calls(small_ms + n * 1.5e-6, reps if n <= sc.SMALL else 3) for n in sc.COLLECTIVE_SIZES]
    merged = [calls(2.0 + n * 3e-6, 3) for n in sc.MERGED_SIZES]
    return {"devices": 8, "samples": {"call": calls(0.0, reps), "chain": calls(0.128, reps), "mm": calls(10.0, 3),
                                      "ew": calls(5.0, 3), "axes": {"model": {"group": 4, "single": single,
                                                                              "merged": merged}}}}


def test_trimmed_mean_cuts_each_tail():
    assert sc.trimmed_mean([1.0] * 9 + [100.0]) == pytest.approx(1.0)
    assert sc.trimmed_mean([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9]) == pytest.approx(4.5)
    assert np.isnan(sc.trimmed_mean([]))


def test_alpha_comes_from_the_small_sizes_not_the_large_ones_noise():
    sizes = np.asarray(sc.COLLECTIVE_SIZES, float)
    secs = 500e-6 + sizes * 2e-9
    assert sc.fit_alpha_beta(sizes, secs) == pytest.approx((500e-6, 2e-9), rel=1e-6)
    noisy = secs * np.array([1.0, 1.0, 1.0, 1.1])  # 10% off on 8 MiB: 1.7 ms, three times alpha
    alpha, beta = sc.fit_alpha_beta(sizes, noisy)
    assert alpha == pytest.approx(500e-6, rel=0.05) and beta == pytest.approx(2e-9, rel=0.15)
    # least squares on absolute seconds puts that error into alpha
    A = np.stack([np.ones(4), sizes], 1)
    (abs_alpha, _), *_ = np.linalg.lstsq(A, noisy, rcond=None)
    assert abs(abs_alpha - 500e-6) > 3 * abs(alpha - 500e-6)


def test_combine_pools_the_rounds_and_takes_the_mean_of_a_two_state_latency():
    """A small all-reduce that takes 0.5 ms in some rounds and 1.1 ms in others: the pooled mean is the
    expected cost whichever way the rounds fall (the median of the rounds' medians jumps between states);
    the compute rates are the pooled medians, a slow round's matmuls left out as the steps' median leaves
    them."""
    rng = np.random.default_rng(0)
    a = [_round(rng, 0.5), _round(rng, 0.5), _round(rng, 0.5), _round(rng, 1.1), _round(rng, 1.1), _round(rng, 1.1)]
    b = a[:2] + [_round(rng, 1.1)] + a[3:] + [_round(rng, 0.5)]  # one round more in each state
    b[0]["samples"]["mm"] = [x * 3 for x in b[0]["samples"]["mm"]]  # a slow spell on one round's matmuls
    fa, fb = sc.combine(a), sc.combine(b)
    assert fa["runs"] == 6 and fa["axes"]["model"]["calls"] == [54, 54, 18, 18]
    for f in (fa, fb):
        ms64 = f["axes"]["model"]["ms"][1]
        assert ms64 == pytest.approx(0.8 + (64 << 10) * 1.5e-6, abs=0.15)
        assert f["call_ms"] == pytest.approx(0.7, abs=0.01)
        assert f["bytes_per_s"] == pytest.approx(2.0 * (4 << 20) * 8 / 5e-3, rel=0.01)
        assert f["op_us"] == pytest.approx(1.0, abs=0.2)  # 0.128 ms over 2 x 64 ops
        assert f["axes"]["model"]["alpha_us"] == pytest.approx(800, abs=150)
        assert f["axes"]["model"]["merged_alpha_us"] == pytest.approx(2000, abs=50)
    assert f["flops_per_s"] == pytest.approx(2.0 * 256 * 512 * 512 * 8 / 10e-3, rel=0.01)
    # a failed round is left out; nothing good: the last round as it is
    assert sc.combine(a + [{"error": "boom"}])["runs"] == 6
    assert sc.combine([{"error": "boom"}]) == {"error": "boom"}


def test_split_half_spearman_reads_the_rounds_of_the_dsgd_jobs():
    def row(plan, rounds, job="dsgd", status="ok"):
        return {"plan": plan, "job": job, "status": status, "round_medians": rounds}

    steady = [row("a", [10, 10, 10, 10]), row("b", [20, 20, 20, 20]), row("c", [30, 30, 30, 30]),
              row("a", [99, 1, 99, 1], job="floor"), row("z", [], status="failed")]
    assert split_half_spearman(steady) == pytest.approx(1.0)
    swapping = [row("a", [10, 21, 10, 21]), row("b", [20, 11, 20, 11]), row("c", [30, 30, 30, 30])]
    assert split_half_spearman(swapping) == pytest.approx(0.5)
    assert np.isnan(split_half_spearman(steady[:1]))
