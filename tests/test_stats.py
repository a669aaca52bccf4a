"""Statistics of the studies (stats.py): intervals of known samples, paired differences, verdicts."""
import numpy as np
import pytest

from mgas_jax import stats


def test_t_interval_of_a_known_sample():
    # 1..5: mean 3, s = sqrt(2.5), t_{4, 0.975} = 2.7764451; half width 2.7764451 * sqrt(2.5) / sqrt(5)
    iv = stats.mean_interval([1, 2, 3, 4, 5])
    assert stats.t_quantile(0.95, 4) == pytest.approx(2.7764451052, abs=1e-9)
    assert iv.mean == 3 and iv.n == 5
    assert (iv.low, iv.high) == pytest.approx((3 - 1.963243161, 3 + 1.963243161), abs=1e-8)
    assert stats.t_quantile(0.95, 10 ** 6) == pytest.approx(1.959964, abs=1e-5)
    assert stats.t_quantile(0.99, 9) == pytest.approx(3.249836, abs=1e-6)
    one = stats.mean_interval([0.7])
    assert one.mean == 0.7 and np.isnan(one.low) and np.isnan(one.high)
    with pytest.raises(ValueError, match="no values"):
        stats.mean_interval([])
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_interval([1, 2], confidence=95)


def test_paired_difference_of_a_known_sample():
    # d = a - b = (.02, .01, .03, .01): mean .0175, s = sqrt(2.75e-4 / 3), t_{3, .975} = 3.182446
    a = {(0, 0, 1000): 0.90, (0, 1, 1000): 0.92, (1, 0, 1000): 0.95, (1, 1, 1000): 0.91, (2, 0, 1000): 0.5}
    b = {(0, 0, 1000): 0.88, (0, 1, 1000): 0.91, (1, 0, 1000): 0.92, (1, 1, 1000): 0.90, (9, 9, 1000): 0.1}
    d = stats.paired_difference(a, b, seed=0)
    assert d.units == ((0, 0, 1000), (0, 1, 1000), (1, 0, 1000), (1, 1, 1000))
    np.testing.assert_allclose(d.differences, [0.02, 0.01, 0.03, 0.01], atol=1e-12)
    half = 3.182446305 * np.sqrt(2.75e-4 / 3) / 2
    assert (d.t.mean, d.t.low, d.t.high) == pytest.approx((0.0175, 0.0175 - half, 0.0175 + half), abs=1e-8)
    assert d.only_a == ((2, 0, 1000),) and d.only_b == ((9, 9, 1000),)
    assert stats.verdict(d.t) == "MGAS better"
    # the unpaired intervals of the same numbers overlap: pairing is what detects the difference
    ia, ib = stats.mean_interval([a[u] for u in d.units]), stats.mean_interval([b[u] for u in d.units])
    assert ia.low < ib.high
    # bootstrap: every resampled mean of these d lies within [min, max] of d, and the interval is nested
    assert 0.01 <= d.bootstrap.low <= d.bootstrap.mean <= d.bootstrap.high <= 0.03
    with pytest.raises(ValueError, match="no unit in common"):
        stats.paired_difference({1: 0.5}, {2: 0.5}, seed=0)


def test_verdicts():
    assert stats.verdict(stats.Interval(-0.01, -0.02, -0.001, 6)) == "MGAS worse"
    assert stats.verdict(stats.Interval(0.01, -0.001, 0.02, 6), "X") == "no detectable difference"
    assert stats.verdict(stats.Interval(0.01, 0.001, 0.02, 6), "X") == "X better"
    assert stats.verdict(stats.mean_interval([0.3])).startswith("too few pairs")


def test_bootstrap_is_seeded_and_agrees_with_t_on_a_large_normal_sample():
    x = np.random.default_rng(7).normal(0.9, 0.05, 1000)
    a = stats.bootstrap_interval(x, seed=3, resamples=4000)
    assert a == stats.bootstrap_interval(x, seed=3, resamples=4000)
    assert a != stats.bootstrap_interval(x, seed=4, resamples=4000)
    t = stats.mean_interval(x)
    assert a.mean == t.mean
    # half width 1.96 * 0.05 / sqrt(1000) = 0.0031; the two methods agree to a few percent of it
    assert abs(a.low - t.low) < 2e-4 and abs(a.high - t.high) < 2e-4
    with pytest.raises(ValueError, match="resamples"):
        stats.bootstrap_interval(x, seed=0, resamples=0)
