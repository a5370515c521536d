r"""The paper's toy model: a tied autoencoder with observable features plus one attention head.

Set-up (Part 1 of the book; conventions of the toy):

* :math:`N` feature directions :math:`w_i \in \mathbb{R}^D` are the columns of :math:`W`
  (:math:`D\times N`). A token with activations :math:`f \in \mathbb{R}^N` is :math:`r = W f`.
* A tied autoencoder reads the features back: :math:`f' = \mathrm{ReLU}(W^\top r + b)`,
  :math:`L_\text{recon}` the mean over tokens of :math:`\|f - f'\|^2`.
* One attention head with :math:`W_Q, W_K` of shape :math:`H\times D` (:math:`H` = ``d_head``;
  note: the *toy* stores them as ``(d_head, d_model)``, the transpose of TransformerLens' layout)
  scores a query token :math:`r` against :math:`m` key tokens :math:`s_1, \dots, s_m`:
  :math:`\ell_j = (W_Q r)\cdot(W_K s_j) = r^\top \Omega s_j` with :math:`\Omega = W_Q^\top W_K`
  (:math:`D\times D`). No :math:`1/\sqrt{H}` scale is applied.
* A template :math:`T` (:math:`N\times N`, from a list of ``(query feature, key feature,
  strength)``) defines the target logit :math:`\ell^*_j = \beta\, f(r)^\top T f(s_j)`
  (:math:`\beta` = :attr:`ToyConfig.target_scale`, the target's sharpness).
  :math:`L_\text{attn}` is either the KL divergence (cross-entropy minus the target's entropy)
  from :math:`\operatorname{softmax}(\ell^*)` to :math:`\operatorname{softmax}(\ell)`
  (``attn_loss="ce"``) or the squared error, the mean over :math:`j` of
  :math:`(\ell_j - \ell^*_j)^2` (``attn_loss="mse"``).
* :math:`L = L_\text{recon} + \lambda L_\text{attn}`; :math:`W, b, W_Q, W_K` are trained jointly
  with Adam.

Data: each feature is active with probability ``p_active`` (the paper's :math:`1 - S`), with
value Uniform[0, 1]. With probability ``p_plant`` an example has one template pair planted: a pair is
drawn (uniformly, or by strength), its query feature is switched on in the query token and its key
feature in one random key token. Planting makes the attention signal frequent; without it a pair
co-occurs with probability about :math:`p^2 m` per example.

Rotary option: the query sits at position :math:`m`, the keys at positions :math:`0, \dots,
m-1`; the score is :math:`\ell_j = (W_Q r)^\top M_{m-j} (W_K s_j)` with :math:`M_\delta` from
:func:`svtools.qk.rotary_matrices` (all :math:`H` dimensions rotate, GPT-NeoX layout).
``ToyRun.qk`` is then the :math:`\Delta = 0` core :math:`\Omega`; ``ToyRun.qk_rotary`` has one
decomposition per offset :math:`1, \dots, m`.

Modules: :mod:`svtools.toy.model` (config, template, data, the trained run),
:mod:`svtools.toy.training` (training one or many seeds, sweeps), :mod:`svtools.toy.summaries`
(scalar outcomes and settling steps of a run), :mod:`svtools.toy.sad` (sparse attention
decomposition on the toy, where the features are known). Every public name is importable from
``svtools.toy``.
"""

from svtools.toy.model import ToyBatch, ToyConfig, ToyHistory, ToyRun, linear_template, sample_batch, template_matrix
from svtools.toy.sad import toy_pair_sad, toy_sad_across_runs, toy_sparsity, toy_sparsity_over_training, toy_tokens
from svtools.toy.summaries import failing_pairs, settle_step, settle_steps, summarize
from svtools.toy.training import sweep, train, train_seeds

__all__ = ["ToyConfig", "ToyRun", "ToyHistory", "ToyBatch", "train", "train_seeds", "sample_batch",
           "settle_step", "settle_steps", "summarize", "sweep",
           "template_matrix", "linear_template", "failing_pairs",
           "toy_tokens", "toy_pair_sad", "toy_sparsity", "toy_sparsity_over_training", "toy_sad_across_runs"]
