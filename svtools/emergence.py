"""Readings of the emergence chapter: what the calibrated null says over training, in numbers.

The emergence chapter (Part 3) measures, for several training seeds of the IOI language model
and several checkpoints, the calibrated ratio real / spectrum null of each kind of pair
(:func:`svtools.sad.null_ratio`), the raw Rolls–Tovée sparseness, and held-out accuracy. The
functions here turn those frames into the numbers its text states (the ratio at initialisation,
the sparsest checkpoint, the rise while the task is learnt, how closely attended and random pairs
track each other) and summarise the zero-a-head checks of :func:`svtools.ioi_causal.zero_head_effects`.
They compute nothing the frames do not hold; they only read them the same way every time.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from svtools._checks import SVToolsError, check_columns

__all__ = ["emergence_readings", "zero_summary", "ZERO_GROUPS"]

#: The groups of :func:`svtools.ioi_causal.zero_head_effects`, in words and in reading order.
ZERO_GROUPS = {"chosen": "each IO head", "all chosen": "all IO heads at once", "reference": "each other head"}


def _joined(values: Any) -> str:
    return " / ".join(f"{float(v):.2f}" for v in values)


def emergence_readings(ratio: pd.DataFrame, rolls_tovee: pd.DataFrame, accuracy: pd.DataFrame, *,
                       last: int, band: tuple[float, float] = (0.9, 1.1), half: float = 0.5) -> dict[str, Any]:
    """The numbers the emergence chapter states, read off its per-seed frames.

    Args:
        ratio: :func:`svtools.sad.null_ratio` by ``["seed", "step", "kind"]`` (columns ``seed,
            step, kind, ratio, lo, hi``); must hold step 0, step ``last`` and kinds ``attended``
            and ``random``.
        rolls_tovee: mean raw Rolls–Tovée per seed, step and kind (columns ``seed, step, kind,
            value``).
        accuracy: held-out accuracy per seed and step (columns ``seed, step, metric, value``;
            ``metric == "top1"`` is read).
        last: the last checkpoint's step.
        band: the interval a calibrated null's ratio should fall in at initialisation.
        half: the accuracy whose first crossing (mean over seeds) is reported.

    Returns:
        a dict of plain Python values (keys as the chapter glues them): ``step0_ratios`` (the
        attended ratio per seed, ``"1.00 / 0.99 / 0.98"``), ``step0_in_band`` (how many seeds
        inside ``band``), ``step0_lo``/``step0_hi`` (the extremes of their intervals over
        prompts); ``min_step`` (the checkpoint where the attended ratio, mean over seeds, is
        lowest), ``min_ratio``, ``min_ratio_random``, ``acc_at_min``, ``rt_at_min``; ``rt_step0``,
        ``rt_last`` (attended Rolls–Tovée, mean over seeds); ``acc_half_step`` (first step whose
        mean top-1 accuracy is >= ``half``, or ``"never"``); ``last_ratios``,
        ``last_ratios_random`` (per seed at ``last``), ``last_below`` (seeds whose attended
        interval at ``last`` lies below 1); ``r_att_rnd`` (Pearson correlation of attended and
        random Rolls–Tovée over all (seed, step) points) and ``n_points``.

    Raises:
        SVToolsError: a column, step 0, step ``last`` or a kind is missing.
    """
    check_columns(ratio, ["seed", "step", "kind", "ratio", "lo", "hi"], "emergence_readings(ratio)")
    check_columns(rolls_tovee, ["seed", "step", "kind", "value"], "emergence_readings(rolls_tovee)")
    check_columns(accuracy, ["seed", "step", "metric", "value"], "emergence_readings(accuracy)")
    for frame, what in ((ratio, "ratio"), (rolls_tovee, "rolls_tovee")):
        kinds, steps = set(frame["kind"]), set(frame["step"])
        if not {"attended", "random"} <= kinds:
            raise SVToolsError(f"emergence_readings({what}): needs kinds 'attended' and 'random', has {sorted(kinds)}")
        if not {0, last} <= steps:
            raise SVToolsError(f"emergence_readings({what}): needs steps 0 and {last}, has {sorted(steps)}")
    top1 = accuracy[accuracy["metric"] == "top1"].groupby("step")["value"].mean()
    if top1.empty:
        raise SVToolsError("emergence_readings(accuracy): no rows with metric 'top1'")
    att = ratio[ratio["kind"] == "attended"].set_index(["seed", "step"]).sort_index()
    rnd = ratio[ratio["kind"] == "random"].set_index(["seed", "step"]).sort_index()
    step0, at_last = att.xs(0, level="step"), att.xs(last, level="step")
    by_step = ratio.groupby(["kind", "step"])["ratio"].mean()
    min_step = int(by_step["attended"].idxmin())
    rt = rolls_tovee.groupby(["kind", "step"])["value"].mean()
    crossed = top1[top1 >= half]
    wide = rolls_tovee.pivot_table(index=["seed", "step"], columns="kind", values="value").dropna(
        subset=["attended", "random"])
    r = float(np.corrcoef(wide["attended"], wide["random"])[0, 1]) if len(wide) > 1 else float("nan")
    return {
        "step0_ratios": _joined(step0["ratio"]),
        "step0_in_band": int(step0["ratio"].between(*band).sum()),
        "step0_lo": float(step0["lo"].min()),
        "step0_hi": float(step0["hi"].max()),
        "min_step": min_step,
        "min_ratio": float(by_step["attended", min_step]),
        "min_ratio_random": float(by_step["random", min_step]),
        "acc_at_min": float(top1.get(min_step, float("nan"))),
        "rt_at_min": float(rt["attended", min_step]),
        "rt_step0": float(rt["attended", 0]),
        "rt_last": float(rt["attended", last]),
        "acc_half_step": int(crossed.index[0]) if len(crossed) else "never",
        "last_ratios": _joined(at_last["ratio"]),
        "last_ratios_random": _joined(rnd.xs(last, level="step")["ratio"]),
        "last_below": int((at_last["hi"] < 1).sum()),
        "r_att_rnd": r,
        "n_points": int(len(wide)),
    }


def zero_summary(zero: pd.DataFrame, *, groups: Optional[dict[str, str]] = None) -> pd.DataFrame:
    """:func:`svtools.ioi_causal.zero_head_effects` rows (with a ``seed`` column) as one row per
    seed and group: how many heads, the lowest and highest relative change of the logit
    difference (``"-8%"``, ``"+1%"``: fractions of the unchanged model's mean), and the lowest
    IO-over-S accuracy after the intervention.

    Returns a frame indexed by ``seed`` and ``group`` (the group in words, ``ZERO_GROUPS``
    order) with columns ``heads, lowest, highest, after``.

    Raises:
        SVToolsError: a column is missing.
    """
    check_columns(zero, ["seed", "group", "rel_change", "io_over_s"], "zero_summary")
    groups = dict(ZERO_GROUPS if groups is None else groups)
    g = zero.groupby(["seed", "group"])
    out = pd.DataFrame({"heads": g.size(), "lowest": g["rel_change"].min().map("{:+.0%}".format),
                        "highest": g["rel_change"].max().map("{:+.0%}".format), "after": g["io_over_s"].min()})
    order = [w for k, w in groups.items() if k in set(zero["group"])]
    out = out.rename(index=groups, level="group")
    return out.reindex(order, level="group")
