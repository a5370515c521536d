"""Why singular vectors align with features: the least-squares theory of a bilinear head.

Set-up (Part 2 of the book). Feature frames are ``X`` (query side, ``D x N``) and ``Y`` (key
side, ``D x N'``), features as columns. A query token is ``x = X f``, a key token ``y = Y g``, with
activation vectors ``f`` and ``g`` drawn independently of each other. A head scores them with
``l = x^T Omega y``; the target is ``l* = f^T T g`` for a template ``T`` (``N x N'``). The head that
minimises the squared-error surrogate of the attention loss,

    L(Omega) = E[(x^T Omega y - f^T T g)^2] = || F^(1/2) (X^T Omega Y - T) G^(1/2) ||_F^2,

with ``F = E[f f^T]`` and ``G = E[g g^T]`` (second moments, *not* covariances), solves the normal
equations ``(X F X^T) Omega (Y G Y^T) = X F T G Y^T``; the minimum-norm solution is

    Omega* = (X F X^T)^+ X F T G Y^T (Y G Y^T)^+.                                  (closed form)

For a single pair ``T = e_i e_j^T`` the right-hand side has rank one, so ``Omega*`` has rank one
with ``u ∝ (X F X^T)^+ X F e_i``: the least-squares *linear probe* for ``f_i`` from ``x``. With
independent zero-mean activations of equal variance (``F ∝ I``) that is ``Sigma_X^+ x_i`` with
``Sigma_X = X X^T``: the *whitened* feature direction (Theorem 1). Everything here is computed
in float64 internally and returned in the input's dtype.

Interference (deviation of a frame from isotropy). We use the trace-normalised definition::

    E_X = Sigma_X / (tr Sigma_X / D) - I,       ||E_X||_2 = max_k |lambda_k / mean(lambda) - 1|,

which is dimensionless, 0 exactly for tight (isotropic) frames, and at most ``D - 1``
(all of the frame in one direction). ``normalise="none"`` gives ``Sigma_X - (tr Sigma_X / D) I``
in units of squared feature norm instead (``N/D`` times larger for unit-norm features).

Modules: :mod:`svtools.theory.closed_forms` (the theorems' closed forms: whitened directions,
the optimal head, interference and the alignment bounds, un-whitening) and
:mod:`svtools.theory.experiments` (the numerical experiments that check them: heads and frames
trained by gradient descent, sampled least squares, random frames of given interference and the
sweep over them). Every public name is importable from ``svtools.theory``.
"""

from svtools.theory.closed_forms import (Activation, alignment_floor, attention_loss, frame_spectrum, interference,
                                         interference_matrix, mean_alignment_bound, mean_drift, measure_frame,
                                         optimal_omega, probe_directions, unwhiten, whitened_directions,
                                         whitening_alignment)
from svtools.theory.experiments import (BilinearRun, FrameRun, alignment_sweep, frame, head_report,
                                        least_squares_omega, sample_pairs, toy_optimal_omega, train_bilinear,
                                        train_frame)

__all__ = [
    "Activation", "whitened_directions", "probe_directions", "optimal_omega", "attention_loss",
    "sample_pairs", "least_squares_omega", "toy_optimal_omega", "BilinearRun", "train_bilinear",
    "interference_matrix", "interference", "frame_spectrum", "frame", "whitening_alignment",
    "alignment_floor", "mean_alignment_bound", "unwhiten", "FrameRun", "train_frame", "alignment_sweep",
    "mean_drift", "head_report", "measure_frame",
]
