"""The LID search with its defaults on models and data it was never tuned on.

Each case (benchmarks/search_robustness.py) trains its own model: tabular data with standardised and
with raw features, synthetic images with a CNN, unit-norm embedding vectors (and the same function with
inputs ×10⁻³ and ×10³), 100 classes. What a user relies on, for every case and three thresholds:
the final checkpoint meets τ on the search data, a looser τ leaves a strictly larger domain, and a τ
the model cannot reach is refused in one sentence. ``make bench`` runs the same cases plus a
1.86·10⁶-parameter MLP on MNIST.
"""

from __future__ import annotations

import pytest
import torch

import lid_engine as le
from benchmarks.search_robustness import DELTAS, SMALL_CASES, run_case
from tests.helpers.sampling import sample_parameters, sampled_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(SMALL_CASES))
def case(request):
    return SMALL_CASES[request.param]()


@pytest.fixture(scope="module")
def runs(case):
    return run_case(case)


def test_the_final_checkpoint_meets_tau_on_the_search_data(case, runs):
    acc, results = runs
    for r in results:
        assert r.final_search_metric >= r.tau, (
            f"{case.name}, τ = {r.tau:.4f}: the final checkpoint certifies {r.final_search_metric:.4f} on the search data")
        assert r.final_width > 0, f"{case.name}, τ = {r.tau:.4f}: the domain collapsed to a point"


def test_a_looser_tau_gives_a_strictly_larger_domain(case, runs):
    _, results = runs
    widths = [r.final_width for r in results]  # τ decreases along DELTAS
    assert all(a < b for a, b in zip(widths, widths[1:])), f"{case.name}: width sums {widths} for Δ = {DELTAS}"


def test_an_unreachable_tau_is_refused_in_one_sentence(case):
    xs, ys = case.search
    acc = le.accuracy(case.model, xs, ys)
    if acc >= 1.0:  # every τ ≤ 1 is reachable on the search data: make it unreachable on the held-out data
        xc, yc = case.cert[0], (case.cert[1] + 1) % int(case.cert[1].max() + 1)
        tau, where = 0.99, "held-out certification data"
    else:
        xc, yc = case.cert
        tau, where = min(1.0, acc + 0.01), "search data"
    with pytest.raises(le.LidSearchError) as err:
        le.compute_lid(case.model, xs, ys, tau=tau, cert_x=xc, cert_y=yc, progress=False)
    message = str(err.value)
    assert "cannot be reached" in message and where in message and f"{tau:g}" in message
    assert message.count(". ") == 0 and message.endswith(".") and "\n" not in message, message


def test_certificates_of_the_robust_search_hold_at_sampled_parameters():
    """The search changed, the certificates must not: sample the final member of a default search on
    the embeddings ×1000 case (the largest input scale) at uniform points and vertices."""
    case = SMALL_CASES["embeddings ×1000"]()
    xs, ys = case.search
    tau = le.tau_from_accuracy(le.accuracy(case.model, xs, ys), 0.15)
    lid = le.compute_lid(case.model, xs, ys, tau=tau, cert_x=case.cert[0], cert_y=case.cert[1], keep="all",
                         progress=False)
    box = lid.members[-1]
    xc, yc = case.cert
    outs = sampled_outputs(case.model, sample_parameters(box, 400, seed=5), xc)
    sampled = (outs.argmax(-1) == yc).double().mean(-1)
    assert lid.certificates[-1]["task"].certified_accuracy <= float(sampled.min())
    assert box.contains(case.model)


def test_scaled_steps_follow_the_input_scale():
    """A function-preserving rescaling of the inputs (×10³, first layer ÷10³) must not change what the
    search can certify by much: the step sizes follow the sensitivity, not the units."""
    xs_ = {}
    for scale in (1.0, 1e3):
        case = SMALL_CASES["embeddings" if scale == 1.0 else "embeddings ×1000"]()
        xs, ys = case.search
        tau = le.tau_from_accuracy(le.accuracy(case.model, xs, ys), 0.15)
        lid = le.compute_lid(case.model, xs, ys, tau=tau, cert_x=case.cert[0], cert_y=case.cert[1], keep="all",
                             progress=False)
        first = lid.members[-1].width("0.weight").double().mean()
        rest = torch.cat([lid.members[-1].width(n).double().reshape(-1) for n in lid.members[-1].names
                          if n != "0.weight"]).mean()
        xs_[scale] = (float(first), float(rest), lid.search_config["logit_scale"])
    (f1, r1, m1), (f2, r2, m2) = xs_[1.0], xs_[1e3]
    assert m1 == pytest.approx(m2, rel=1e-4), "the typical margin is a property of the function"
    assert f2 < f1 / 30, "first-layer widths shrink with the larger inputs"
    assert r2 > r1 / 30, "the other layers keep widths of the same order"
