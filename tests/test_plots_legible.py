"""Every figure of Parts 1-2 is legible on a phone and labels its axes in math, not ASCII.

The figures are drawn from small real runs (a few training steps): what is measured is the
figure's layout, text sizes and labels, which do not depend on how well the toy trained.
"""

from __future__ import annotations


import pandas as pd
import pytest
from conftest import figure_problems
import torch

from svtools import plots
from svtools import theory as th
from svtools.plots import theory as thp
from svtools.plots import toy as tp
from svtools.toy import ToyConfig, linear_template, settle_steps, sweep, train, train_seeds



@pytest.fixture(scope="module")
def toy_runs():
    torch.set_num_threads(1)
    one = ToyConfig.single_pair(steps=40, log_every=10)
    many = ToyConfig.many_pairs(steps=10)
    runs = train_seeds(many, [0, 1], progress=False)
    base = ToyConfig.single_pair(steps=10, batch=64)
    return {
        "one": train(one, progress=False), "alone": train(one.replace(head=False), progress=False),
        "many": many, "many_runs": runs,
        "sweep": sweep(base, {"lam": [0.1, 1.0], "n_keys": [2, 8], "d_head": [1, 2]}, [0, 1], progress=False),
        "rot": train(base.replace(rotary=True, rotary_base=10.0, n_keys=8), progress=False),
        "crowd": (base.replace(d_head=3, template=linear_template(6, 6)),),
    }


def _figures(r):
    one, many, runs = r["one"], r["many"], r["many_runs"]
    crowd_cfg = r["crowd"][0]
    crowd = train(crowd_cfg, progress=False).alignment()
    yield "feature_geometry", tp.feature_geometry({"autoencoder alone": r["alone"].features,
                                                   "with the head": one.features}, attended=[0, 1])
    yield "singular_spectrum", tp.singular_spectrum(one.qk.S, one.alignment())
    yield "pair_alignment", tp.pair_alignment(runs[0].alignment(), many.strengths, n_show=30)
    yield "pair_alignment (6 pairs)", tp.pair_alignment(crowd, crowd_cfg.strengths)
    yield "pairs_over_seeds", tp.pairs_over_seeds(torch.stack([x.alignment().worst for x in runs]), [0, 1],
                                                  many.strengths)
    yield "training_dynamics", tp.training_dynamics(one.history, settle_steps(one.history))
    yield "sweep", tp.sweep(r["sweep"], ["lam", "n_keys", "d_head"], "cos_min",
                            ylabel=r"$\min(|\cos_q|, |\cos_k|)$", ref=1.0, ref_label="reported")
    yield "offset_alignment", tp.offset_alignment(*r["rot"].offset_alignment())
    X = th.frame(20, 10, 2.0, seed=1, spectrum="power")
    act = th.Activation(p_active=0.1, centered=True)
    heads = {"closed form": th.optimal_omega(X, X, [(0, 1, 1.0)], act),
             "sample least squares": th.least_squares_omega(
                 *th.sample_pairs(X, X, [(0, 1, 1.0)], act, 4000, torch.Generator().manual_seed(0)))}
    table = th.head_report(heads, X, X, 0, 1).assign(frame="anisotropic (2)")
    spectra = {f"{m}, anisotropic (2)": torch.linalg.svdvals(h.double()) for m, h in heads.items()}
    yield "plot_theorem1", thp.plot_theorem1(spectra, table)
    yield "plot_mean_effect", thp.plot_mean_effect([1, 2, 4], {"p = 0.1": [1.0, 0.95, 0.9]})
    sw = th.alignment_sweep([0, 1, 10, 55], N=128, D=64, spectrum="spike", seeds=(0,), n_check=2, n_cov=500,
                            progress=False)
    yield "plot_alignment_vs_interference", thp.plot_alignment_vs_interference(
        sw, measured={"a dictionary": th.measure_frame(X)})
    W0 = X / X.norm(dim=0)
    Om = th.optimal_omega(W0, W0, [(0, 1, 1.0)], th.Activation(p_active=0.1))
    runs3 = {"attention + reconstruction": th.train_frame(W0, Om, (0, 1), th.Activation(p_active=0.1), lam=10.0,
                                                          steps=20, progress=False)}
    yield "plot_frame_training", thp.plot_frame_training(runs3, predicted_cos=0.9, predicted_interference=0.1)
    yield "plot_unwhitening", thp.plot_unwhitening(sw)


def test_every_figure_is_legible_on_a_phone_and_fits_the_column(toy_runs):
    bad = figure_problems(_figures(toy_runs))
    assert not bad, "\n".join(bad)


def test_svg_text_reads_every_text_and_its_size():
    fig, ax = plots.subplots(width=0.5)
    ax.set_xlabel(r"$\sigma_k$", fontsize=12)
    ax.set_title("title", fontsize=10, color="0.3")     # a coloured text is written with a style first
    ax.tick_params(labelsize=8)
    width, texts = plots.svg_text(plots.to_svg(fig))
    sizes = dict((t, s) for s, t in texts)
    assert sizes[r"$\sigma_k$"] == pytest.approx(12) and sizes["title"] == pytest.approx(10)
    assert min(s for s, _ in texts) == pytest.approx(8)
    assert width == pytest.approx(fig.get_tightbbox().width * 72, rel=0.1)
    px, _ = plots.legibility(fig)
    assert px == pytest.approx(8 * min(width * 4 / 3, plots.PHONE_FIGURE_PX) / width)
    with pytest.raises(ValueError):
        plots.svg_text("<p>not an svg</p>")


def test_legibility_fails_a_wide_figure_with_small_text():
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 3))
    fig.add_subplot().set_xlabel("x", fontsize=9)
    plt.close(fig)
    assert plots.legibility(fig)[0] < plots.MIN_TEXT_PX
