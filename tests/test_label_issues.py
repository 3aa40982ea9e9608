"""cleanlab (the real package) on the LOO's class probabilities of one training run."""

import dataclasses
import functools
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("cleanlab")

from ivon_core import IVON  # noqa: E402
from sensitivity import compute_sensitivities, ivon_variance  # noqa: E402
from worker.integrations.label_issues import find_label_issues, health_summary, label_quality, pred_probs  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "integrations" / "cleanlab.md"


@functools.cache
def _result(n=300, flips=30):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, :3].argmax(1)).long()
    flipped = torch.arange(flips)
    y[flipped] = (y[flipped] + 1) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = IVON(model.parameters(), lr=0.2, ess=n, hess_init=0.3, beta2=0.99)
    for _ in range(60):
        for b in torch.randperm(n, generator=g).split(50):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    order = torch.randperm(n, generator=g)  # a data source in another order, with its own indices
    return compute_sensitivities(model, (x[order], y[order], order), ivon_variance(opt, model)), flipped


def test_pred_probs_are_the_loo_class_probabilities_in_index_order():
    res, _ = _result()
    indices, labels, probs = pred_probs(res)
    assert np.array_equal(indices, np.arange(300))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-12) and probs.dtype == np.float64
    row = int((res.indices == 7).nonzero())
    assert np.allclose(probs[7], res.loo_class_probs()[row].double().numpy(), atol=1e-6)
    # the probability of the given label is the LOO's own (exp(−LOO loss))
    own = res.loo_probs.numpy()[np.argsort(res.indices.numpy())]
    assert np.allclose(probs[np.arange(300), labels], own, atol=1e-5)


def test_cleanlab_finds_the_flipped_labels_from_one_run():
    res, flipped = _result()
    issues = find_label_issues(res)
    assert len(issues) > 0 and len(set(issues.tolist()) & set(flipped.tolist())) >= 0.5 * len(flipped)
    precision = np.isin(issues, flipped.numpy()).mean()
    assert precision >= 0.5
    idx, quality = label_quality(res)
    flipped_mask = np.isin(idx, flipped.numpy())
    assert quality[flipped_mask].mean() < quality[~flipped_mask].mean()
    summary = health_summary(res)
    assert 0.0 < summary["overall_label_health_score"] < 1.0


def test_targets_that_are_not_class_labels_are_refused():
    res, _ = _result()
    with pytest.raises(ValueError, match="integer class labels"):
        pred_probs(dataclasses.replace(res, targets=res.targets.double() + 0.5))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        pred_probs(dataclasses.replace(res, targets=torch.full_like(res.targets, 7)))


def test_the_documented_example_runs(tmp_path, capsys):
    script = tmp_path / "example.py"
    script.write_text(re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1))
    out = runpy.run_path(str(script))
    caught = len(set(out["issues"].tolist()) & set(out["flipped"].tolist()))
    assert caught >= len(out["flipped"]) // 2
    assert "flipped labels among them" in capsys.readouterr().out


def test_several_evaluations_are_averaged_by_index():
    res, _ = _result()
    half = dataclasses.replace(res, indices=res.indices[:100], targets=res.targets[:100], logits=res.logits[:100],
                               deviations=res.deviations[:100] * 0.0, loo_probs=res.loo_probs[:100])
    indices, _, probs = pred_probs([res, half])
    one = pred_probs(res)[2]
    inside = np.isin(indices, res.indices[:100].numpy())
    assert np.allclose(probs[~inside], one[~inside])  # examples in one evaluation keep its probabilities
    in_sample = res.logits.softmax(-1).double().numpy()[np.argsort(res.indices.numpy())]
    assert np.allclose(probs[inside], (one[inside] + in_sample[inside]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="no sensitivity results"):
        pred_probs([])
