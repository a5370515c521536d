"""Issue 20: a finite-loss guard in every trainer. A run whose loss becomes NaN or infinite stops
with an SVToolsError naming the step, instead of returning (or caching) NaN weights; and the
trainers' seeds and step counts are never truncated from floats."""

from __future__ import annotations

import pytest
import torch

from svtools import SVToolsError
from svtools import theory as th


def _frame(D=6, N=4, seed=0):
    X = torch.randn(D, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X / X.norm(dim=0)


def test_train_bilinear_stops_when_the_loss_is_not_finite():
    """(The "ce" loss is a KL divergence of log-softmaxes: it stays finite even here.)"""
    X = _frame()
    with pytest.raises(SVToolsError, match="diverged"):
        th.train_bilinear(X, X, [(0, 1, 1.0)], th.Activation(), loss="mse", target_scale=1e200, steps=20,
                          batch=64, lr=1e8, progress=False)


def test_train_frame_stops_when_the_loss_is_not_finite():
    X = _frame()
    Om = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(SVToolsError, match="diverged"):
        th.train_frame(X, Om * 1e150, (0, 1), th.Activation(), recon="relu", steps=20, batch=64, lr=1e8,
                       progress=False)


@pytest.mark.parametrize("kw, name", [(dict(seed=1.7), "seed"), (dict(seed=-1), "seed"), (dict(steps=2.5), "steps"),
                                      (dict(batch=True), "batch"), (dict(lr="0.01"), "lr")])
def test_trainer_arguments_are_not_truncated(kw, name):
    X = _frame()
    Om = torch.eye(6, dtype=torch.float64)
    args = dict(steps=3, batch=16, progress=False) | kw
    with pytest.raises(SVToolsError, match=name):
        th.train_bilinear(X, X, [(0, 1, 1.0)], th.Activation(), **args)
    with pytest.raises(SVToolsError, match=name):
        th.train_frame(X, Om, (0, 1), th.Activation(), **args)
