"""The paper's toy model: a tied autoencoder with observable features plus one attention head.

Set-up (Part 1 of the book; conventions of the toy):

* ``N`` feature directions ``w_i`` in ``R^D`` are the columns of ``W`` (``D x N``). A token with
  activations ``f`` (``N``) is ``r = W f``.
* A tied autoencoder reads the features back: ``f' = ReLU(W^T r + b)``,
  ``L_recon = mean_tokens |f - f'|^2``.
* One attention head with ``W_Q, W_K`` of shape ``(H, D)`` (``H = d_head``; note: the *toy* stores
  them as ``(d_head, d_model)``, the transpose of TransformerLens' layout) scores a query token
  ``r`` against ``m`` key tokens ``s_1..s_m``: ``l_j = (W_Q r) . (W_K s_j) = r^T Omega s_j`` with
  ``Omega = W_Q^T W_K`` (``D x D``). No ``1/sqrt(H)`` scale is applied.
* A template ``T`` (``N x N``, from a list of ``(query feature, key feature, strength)``) defines
  the target logit ``l*_j = beta * f(r)^T T f(s_j)`` (``beta`` = :attr:`ToyConfig.target_scale`,
  the target's sharpness). ``L_attn`` is either the KL divergence (= cross-entropy minus the
  target's entropy) from ``softmax(l*)`` to ``softmax(l)`` (``attn_loss="ce"``) or the squared error
  ``mean_j (l_j - l*_j)^2`` (``attn_loss="mse"``).
* ``L = L_recon + lambda * L_attn``; ``W, b, W_Q, W_K`` are trained jointly with Adam.

Data: each feature is active with probability ``p_active`` (the paper's ``1 - S``), with value
Uniform[0, 1]. With probability ``p_plant`` an example has one template pair planted: a pair is
drawn (uniformly, or by strength), its query feature is switched on in the query token and its key
feature in one random key token. Planting makes the attention signal frequent; without it a pair
co-occurs with probability ``~ p_active^2 * m`` per example.

Rotary option: the query sits at position ``m``, the keys at positions ``0..m-1``; the score is
``l_j = (W_Q r)^T M_(m-j) (W_K s_j)`` with ``M_delta`` from :func:`svtools.qk.rotary_matrices`
(all ``H`` dims rotate, GPT-NeoX layout). ``ToyRun.qk`` is then the Delta = 0 core ``Omega``;
``ToyRun.qk_rotary`` has one decomposition per offset ``1..m``.

Modules: :mod:`svtools.toy.model` (config, template, data, the trained run),
:mod:`svtools.toy.training` (training one or many seeds, sweeps), :mod:`svtools.toy.summaries`
(scalar outcomes and settling steps of a run), :mod:`svtools.toy.sad` (sparse attention
decomposition on the toy, where the features are known). Every public name is importable from
``svtools.toy``.
"""

from svtools.toy.model import ToyBatch, ToyConfig, ToyHistory, ToyRun, linear_template, sample_batch, template_matrix
from svtools.toy.sad import toy_pair_sad, toy_sparsity, toy_sparsity_over_training, toy_tokens
from svtools.toy.summaries import failing_pairs, settle_step, settle_steps, summarize
from svtools.toy.training import sweep, train, train_seeds

__all__ = ["ToyConfig", "ToyRun", "ToyHistory", "ToyBatch", "train", "train_seeds", "sample_batch",
           "settle_step", "settle_steps", "summarize", "sweep",
           "template_matrix", "linear_template", "failing_pairs",
           "toy_tokens", "toy_pair_sad", "toy_sparsity", "toy_sparsity_over_training"]
