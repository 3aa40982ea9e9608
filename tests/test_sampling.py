import numpy as np
import pytest
from scipy.stats import spearmanr

from worker.sampling import spearman


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_matches_scipy_with_and_without_ties(ties):
    g = np.random.default_rng(0)
    for n in (3, 10, 500):
        a, b = g.normal(size=n), g.normal(size=n)
        if ties:
            a, b = np.round(a), np.round(b * 2)
        b = b + 0.5 * a
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_is_nan_where_it_is_undefined():
    assert np.isnan(spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0])))
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


def test_spearman_names_mismatched_inputs():
    with pytest.raises(ValueError, match="a and b must be 1-D and of one length"):
        spearman(np.arange(4.0), np.arange(5.0))
    with pytest.raises(ValueError, match="1-D"):
        spearman(np.ones((3, 2)), np.ones((3, 2)))
