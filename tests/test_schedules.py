"""kalnat.schedules: the translation between Kalman and natural-gradient settings."""

import numpy as np
import pytest

from kalnat import schedules as S


def test_kalman_schedule_closed_form():
    """1/η_t = λ^t/η_0 + (1 − λ^t)/(1 − λ) for a constant λ < 1; 1/η_0 + t for λ = 1."""
    t = np.arange(1, 301)
    for lam, eta0 in [(1.0, 0.3), (0.95, 0.3), (0.8, 4.0)]:
        etas = S.learning_rates(S.kalman(lam), eta0, 300)
        inv = 1 / eta0 + t if lam == 1 else lam**t / eta0 + (1 - lam**t) / (1 - lam)
        np.testing.assert_allclose(etas, 1 / inv, rtol=1e-12)


def test_round_trip():
    prior = np.array([[2.0, 0.3], [0.3, 1.0]])
    ng = S.kalman_to_natural(prior, forgetting=0.97, eta0=0.4)
    np.testing.assert_allclose(ng.init_fisher, 0.4 * np.linalg.inv(prior), rtol=1e-14)
    assert ng.learning_rate == S.Kalman(0.97) and ng.fisher_rate is None
    back = S.natural_to_kalman(**ng._asdict())
    np.testing.assert_allclose(back.prior_var, prior, rtol=1e-14)
    assert back.forgetting == 0.97
    assert S.natural_to_kalman(S.constant(0.1), eta0=0.1, init_fisher=2.0) == S.KalmanSettings(0.05, 0.9)
    np.testing.assert_allclose(S.kalman_to_natural(np.array([1.0, 4.0])).init_fisher, [1.0, 0.25])


def test_no_counterpart_raises():
    with pytest.raises(ValueError, match="additive process noise"):
        S.kalman_to_natural(1.0, process_noise=1e-3)
    with pytest.raises(ValueError, match="Fisher rate"):
        S.natural_to_kalman(S.kalman(), fisher_rate=S.constant(0.1))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        S.natural_to_kalman(S.constant(1.5))
    with pytest.raises(ValueError, match="positive definite"):
        S.natural_to_kalman(S.kalman(), init_fisher=np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="positive"):
        S.kalman_to_natural(-1.0)
    with pytest.raises(ValueError, match="eta0"):
        S.kalman_to_natural(1.0, eta0=0.0)


def test_same_schedule_as_fisher_rate_is_accepted():
    lr = S.kalman(0.9)
    assert S.natural_to_kalman(lr, fisher_rate=S.kalman(0.9)).forgetting == 0.9


def test_as_schedule():
    assert S.as_schedule(0.1) == S.Constant(0.1)
    f = S.as_schedule(lambda t: 1.0 / t)
    assert isinstance(f, S.Function) and float(f(4, 1.0)) == 0.25


def test_a_rate_that_needs_forgetting_above_one_has_no_filter():
    """A constant rate c after η_0 > c/(1 − c), or a schedule that falls too fast, would need λ_t > 1
    (negative process noise): refused, naming the step, where the filter itself refuses λ > 1."""
    with pytest.raises(ValueError, match=r"λ_1 = 9, outside \(0, 1\].*eta0 ≤ 0.111111"):
        S.natural_to_kalman(S.constant(0.1), eta0=1.0)
    with pytest.raises(ValueError, match=r"λ_3"):
        S.natural_to_kalman(lambda t: 0.9 if t < 3 else 0.1, eta0=0.9)
    # feasible ones still translate: the first step's λ_1 = η_0 (1/c − 1) ≤ 1
    assert S.natural_to_kalman(S.constant(0.5), eta0=0.5).forgetting == 0.5
    settings = S.natural_to_kalman(lambda t: 1.0 / (t + 1), eta0=1.0)
    assert float(settings.forgetting(5)) == pytest.approx(1.0)
