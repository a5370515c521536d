"""GPT-2's tanh GELU for training the IOI LM: transformers' ``NewGELUActivation``, bit for bit, in fewer
tensors and autograd nodes (:class:`NewGELU`; ``svtools.ioi_lm.training`` puts it in the MLPs of the model
it trains)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NewGELU", "NewGELUFunction"]

C = math.sqrt(2.0 / math.pi)
A = 0.044715


class NewGELUFunction(torch.autograd.Function):
    r"""GPT-2's tanh GELU, ``0.5 x (1 + tanh(c (x + a x^3)))`` (``c = sqrt(2 / pi)``, ``a = 0.044715``), with
    the value and gradient that autograd gives transformers' ``NewGELUActivation``, bit for bit, in fewer
    tensors and autograd nodes.

    Forward: the same roundings in the same order (``x^3``, ``* a``, ``+ x``, ``* c``, tanh; ``x * 0.5``,
    ``t + 1``, their product), in place where autograd would allocate. Backward: autograd's chain for that
    expression, op for op (a product's gradient is ``grad * other``; tanh's is ``tanh_backward``; ``x^3``'s is
    ``grad * (3 * x^2)``), and the three gradients reaching ``x`` summed in the order autograd's engine adds
    them (nodes run latest-created first: the ``+ x`` branch, then ``x^3``, then ``x * 0.5``).
    ``tests/test_ioi_lm.py`` compares value and gradient with transformers' module using ``torch.equal``
    on the bits, zeros' signs and infinities included.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        """``y = 0.5 x (1 + tanh(c (x + a x^3)))``, elementwise (any shape); saves what the backward needs."""
        t = torch.pow(x, 3.0).mul_(A).add_(x).mul_(C).tanh_()
        half, one_t = x * 0.5, t + 1.0
        ctx.save_for_backward(x, t, half, one_t)
        return half * one_t

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        """``dL/dx`` from ``dL/dy`` (same shape as ``x``), as autograd computes it for the expression."""
        x, t, half, one_t = ctx.saved_tensors
        g_half = grad * one_t
        g_inner = torch.ops.aten.tanh_backward(grad * half, t).mul_(C)
        g_cube = (g_inner * A).mul_(torch.pow(x, 2.0).mul_(3.0))
        return g_inner.add_(g_cube).add_(g_half.mul_(0.5))


class NewGELU(torch.nn.Module):
    """:class:`NewGELUFunction` as a module (what the training model's MLPs call)."""

    def forward(self, x: Tensor) -> Tensor:
        """The GELU of ``x``, elementwise (any shape)."""
        return NewGELUFunction.apply(x)
