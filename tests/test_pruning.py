"""The pruning rules on synthetic probe histories (pure functions)."""

from __future__ import annotations

import pytest

from kdsearch.service.pruning import ProbePoint, pareto_prune, should_prune, threshold_prune
from kdsearch.service.spec import PruningSpec, Thresholds

THRESHOLDS = Thresholds(sigma_max=0.05, accuracy_drop_max=0.01)
RULE = PruningSpec(
    rule="threshold", warmup_epochs=1, sigma_tolerance=0.5, accuracy_drop_tolerance=0.05
)


def history(*points: tuple[float, float], epochs: int = 5) -> list[ProbePoint]:
    return [ProbePoint(e + 1, epochs, s, d) for e, (s, d) in enumerate(points)]


def test_no_decision_during_warmup_or_at_the_last_epoch() -> None:
    awful = (0.5, 0.5)
    assert not threshold_prune(history(awful), THRESHOLDS, RULE)  # epoch 1: warm-up
    assert threshold_prune(history(awful, awful), THRESHOLDS, RULE)  # epoch 2
    assert not threshold_prune(history(awful, awful, epochs=2), THRESHOLDS, RULE)  # last epoch
    assert not threshold_prune([], THRESHOLDS, RULE)


@pytest.mark.parametrize(
    ("epoch", "sigma_limit", "drop_limit"),
    # epochs = 5, first decision at epoch 2 (p0 = 0.4): slack 1, 2/3, 1/3 at epochs 2, 3, 4
    [
        (2, 0.075, 0.06),
        (3, 0.05 * (1 + 0.5 * 2 / 3), 0.01 + 0.05 * 2 / 3),
        (4, 0.05 * (1 + 0.5 / 3), 0.01 + 0.05 / 3),
    ],
)
def test_tolerance_tightens_linearly(epoch: int, sigma_limit: float, drop_limit: float) -> None:
    good = (0.0, 0.0)

    def at(sigma: float, drop: float) -> list[ProbePoint]:
        return history(*([good] * (epoch - 1)), (sigma, drop))

    eps = 1e-9
    assert not threshold_prune(at(sigma_limit - eps, 0.0), THRESHOLDS, RULE)
    assert threshold_prune(at(sigma_limit + eps, 0.0), THRESHOLDS, RULE)
    assert not threshold_prune(at(0.0, drop_limit - eps), THRESHOLDS, RULE)
    assert threshold_prune(at(0.0, drop_limit + eps), THRESHOLDS, RULE)


def test_only_the_latest_probe_counts() -> None:
    # bad early, recovered now: continue
    assert not threshold_prune(history((0.2, 0.3), (0.04, 0.0)), THRESHOLDS, RULE)


def test_nan_sigma_alone_does_not_prune() -> None:
    assert not threshold_prune(history((0.0, 0.0), (float("nan"), 0.0)), THRESHOLDS, RULE)


PARETO = PruningSpec(rule="pareto", warmup_epochs=1, pareto_min_trials=2, pareto_margin=0.01)


def test_pareto_needs_k_dominating_finished_trials_at_the_same_epoch() -> None:
    current = history((0.1, 0.1), (0.08, 0.05))
    better = history((0.05, 0.05), (0.06, 0.03))  # dominates at epoch 2 by >= 0.01 in both
    close = history((0.05, 0.05), (0.075, 0.045))  # better, but by less than the margin
    tradeoff = history((0.01, 0.2), (0.01, 0.2))  # better sigma, worse drop: no domination
    short = history((0.0, 0.0))  # no probe at epoch 2
    assert not pareto_prune(current, [better], PARETO)
    assert pareto_prune(current, [better, better], PARETO)
    assert not pareto_prune(current, [better, close, tradeoff, short], PARETO)
    assert not pareto_prune(current[:1], [better, better], PARETO)  # warm-up


def test_should_prune_names_the_rule() -> None:
    both = PruningSpec(rule="threshold+pareto", warmup_epochs=1, pareto_min_trials=1)
    fine_by_threshold = history((0.0, 0.0), (0.06, 0.02))
    dominator = history((0.0, 0.0), (0.01, 0.0))
    assert should_prune(fine_by_threshold, [], THRESHOLDS, both) is None
    assert should_prune(fine_by_threshold, [dominator], THRESHOLDS, both) == "pareto"
    assert should_prune(history((0, 0), (0.5, 0.5)), [], THRESHOLDS, both) == "threshold"
    off = PruningSpec(rule="none")
    assert should_prune(history((0, 0), (0.5, 0.5)), [dominator], THRESHOLDS, off) is None


def test_probe_point_round_trips_through_user_attrs() -> None:
    point = ProbePoint(2, 3, 0.04, 0.01)
    assert ProbePoint.from_dict(point.as_dict()) == point
    assert point.progress == pytest.approx(2 / 3)


def test_step_probes_decide_with_full_slack_until_the_first_epoch_end_decision() -> None:
    """Probes every N steps: fractional epochs. Between the warm-up and epoch warmup+1
    the slack is full; after it, the epoch-end schedule above (here 5 epochs, p0 = 0.4)."""
    sigma_limit = lambda slack: 0.05 * (1 + 0.5 * slack)  # noqa: E731
    for epoch, slack in ((0.5, None), (1.0, None), (1.25, 1.0), (2.0, 1.0), (2.5, 5 / 6)):
        just_over = [ProbePoint(epoch, 5, sigma_limit(slack or 1.0) + 1e-9, 0.0)]
        just_under = [ProbePoint(epoch, 5, sigma_limit(slack or 1.0) - 1e-9, 0.0)]
        assert threshold_prune(just_over, THRESHOLDS, RULE) is (slack is not None), epoch
        assert not threshold_prune(just_under, THRESHOLDS, RULE), epoch
    # 2 epochs, warm-up 1: only step probes within epoch 2 decide, with the full slack.
    assert threshold_prune([ProbePoint(1.5, 2, 0.076, 0.0)], THRESHOLDS, RULE)
    assert not threshold_prune([ProbePoint(1.5, 2, 0.074, 0.0)], THRESHOLDS, RULE)


def test_pareto_compares_epoch_ends_only() -> None:
    rule = PruningSpec(rule="pareto", warmup_epochs=1, pareto_min_trials=1)
    dominator = [ProbePoint(1.5, 5, 0.0, 0.0), ProbePoint(2, 5, 0.0, 0.0)]
    assert not pareto_prune([ProbePoint(1.5, 5, 0.5, 0.5)], [dominator], rule)
    assert pareto_prune([ProbePoint(2.0, 5, 0.5, 0.5)], [dominator], rule)
