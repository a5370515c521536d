r"""Why singular vectors align with features: the least-squares theory of a bilinear head.

Set-up (Part 2 of the book). Feature frames are :math:`X` (query side, :math:`D\times N`) and
:math:`Y` (key side, :math:`D\times N'`), features as columns. A query token is :math:`x = X f`, a
key token :math:`y = Y g`, with activation vectors :math:`f` and :math:`g` drawn independently of
each other. A head scores them with :math:`\ell = x^\top \Omega y`; the target is
:math:`\ell^* = f^\top T g` for a template :math:`T` (:math:`N\times N'`). The head that minimises
the squared-error surrogate of the attention loss,

.. math::

    L(\Omega) &= \mathbb{E}\big[(x^\top \Omega y - f^\top T g)^2\big] \\
              &= \big\|F^{1/2} (X^\top \Omega Y - T)\, G^{1/2}\big\|_F^2,

with :math:`F = \mathbb{E}[f f^\top]` and :math:`G = \mathbb{E}[g g^\top]` (second moments, *not*
covariances), solves the normal equations
:math:`(X F X^\top)\, \Omega\, (Y G Y^\top) = X F T G Y^\top`; the minimum-norm solution (the
closed form) is

.. math::

    \Omega^* = (X F X^\top)^+ X F\, T\, G Y^\top (Y G Y^\top)^+ .

For a single pair :math:`T = e_i e_j^\top` the right-hand side has rank one, so :math:`\Omega^*`
has rank one with :math:`u \propto (X F X^\top)^+ X F e_i`: the least-squares *linear probe* for
:math:`f_i` from :math:`x`. With independent zero-mean activations of equal variance
(:math:`F \propto I`) that is :math:`\Sigma_X^+ x_i` with :math:`\Sigma_X = X X^\top`: the
*whitened* feature direction (Theorem 1). Everything here is computed in float64 internally and
returned in the input's dtype.

Interference (deviation of a frame from isotropy). We use the trace-normalised definition

.. math::

    E_X = \frac{\Sigma_X}{\operatorname{tr}\Sigma_X / D} - I, \qquad
    \|E_X\|_2 = \max_k \Big|\frac{\lambda_k}{\bar\lambda} - 1\Big|,

which is dimensionless, 0 exactly for tight (isotropic) frames, and at most :math:`D - 1` (all of
the frame in one direction). ``normalise="none"`` gives
:math:`\Sigma_X - (\operatorname{tr}\Sigma_X / D)\, I` in units of squared feature norm instead
(:math:`N/D` times larger for unit-norm features).

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
