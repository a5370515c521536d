"""sad.compare_kinds: verdicts from bootstrap intervals, checked on hand-made summaries."""

import pandas as pd
import pytest

from svtools import SVToolsError, sad


def summary():
    rows = []
    for layer, (a, b) in enumerate([((0.1, 0.2), (0.3, 0.4)), ((0.5, 0.6), (0.3, 0.4)), ((0.2, 0.35), (0.3, 0.4))]):
        for kind, (lo, hi) in (("attended", a), ("non-attended", b)):
            rows.append({"layer": layer, "kind": kind, "column": "rolls_tovee", "stat": "mean",
                         "estimate": (lo + hi) / 2, "lo": lo, "hi": hi, "pairs": 10, "prompts": 5})
            rows.append({"layer": layer, "kind": kind, "column": "rolls_tovee_rotated", "stat": "mean",
                         "estimate": 0.9, "lo": 0.85, "hi": 0.95, "pairs": 10, "prompts": 5})
    return pd.DataFrame(rows)


def test_verdicts():
    v = sad.compare_kinds(summary(), "attended", "non-attended")
    assert v["verdict"].tolist() == ["lower", "higher", "overlap"]
    assert v["layer"].tolist() == [0, 1, 2]
    rot = sad.compare_kinds(summary(), "attended", "attended", column_b="rolls_tovee_rotated")
    assert rot["verdict"].tolist() == ["lower", "lower", "lower"]


def test_needs_a_summary():
    with pytest.raises(SVToolsError, match="column"):
        sad.compare_kinds(pd.DataFrame({"layer": [0]}))


def test_toy_pair_sad_rows_match_the_direct_terms():
    from svtools import n_recon, sad_terms
    from svtools.toy import toy_pair_sad
    from svtools.toy import ToyConfig, train

    run = train(ToyConfig.single_pair(steps=200), progress=False)
    df = toy_pair_sad(run)
    assert len(df) == len(run.cfg.template)
    W = run.features
    for p, (i, j, _) in enumerate(run.cfg.template):
        t = sad_terms(run.qk, W[:, i], W[:, j])
        omega = run.qk.omega()
        assert abs(df.loc[p, "score"] - float(W[:, i] @ omega @ W[:, j])) < 1e-4 * (1 + abs(df.loc[p, "score"]))
        assert df.loc[p, "n_recon"] == int(n_recon(t))
        assert df.loc[p, "dominant_k"] == int(t.abs().argmax())
