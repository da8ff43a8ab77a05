"""The research analyses: importing one runs nothing, each has a main whose --help exits 0, and the
fusion-rule candidates equal values worked by hand."""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
import pytest

import analysis

MODULES = sorted(m.name for m in pkgutil.iter_modules(analysis.__path__))


def test_there_are_analyses():
    assert {"fusion_rules", "guide_directions"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_an_analysis_runs_nothing_on_import_and_has_a_main(name, capsys):
    module = importlib.import_module(f"analysis.{name}")
    assert capsys.readouterr().out == ""  # no work (and no printing) at import
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


def test_fusion_rule_candidates_by_hand():
    from analysis.fusion_rules import rules

    guide = np.array([[0.5, 0.9], [0.1, 0.5]])
    batch = np.array([[1.0, 4.0], [2.0, 3.0]])
    got = rules(guide, batch)
    np.testing.assert_allclose(got["geometric"], np.sqrt(guide * batch), rtol=1e-6)
    # ranks over the four patches: guide (0.5 ties at 2.5), batch 1..4; divided by 4
    np.testing.assert_allclose(got["rankmean"], (np.array([[2.5, 4], [1, 2.5]]) + np.array([[1, 4], [2, 3]])) / 8)
    z = (batch - batch.mean()) / batch.std()
    np.testing.assert_allclose(got["zmean_w0.5"], 0.5 * (guide - guide.mean()) / guide.std() + 0.5 * z, atol=1e-9)
