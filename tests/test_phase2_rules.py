"""Phase 2's schedule rules on plain sequences of accuracies and rollout lengths: keep-best, the plateau rule,
the gated refresh, the clock, when to evaluate, and the progress saved in the checkpoint. No model: each
expectation below is worked out by hand from the rule's definition."""

import json

from sdzero.distill import DistillConfig
from sdzero.phase2_rules import Budget, Progress, RefreshEvidence, length_tail


def evals(progress, cfg, curve):
    """Feed (step, accuracy) pairs to record_eval; the decisions as (keep_weights, refresh_teacher) pairs."""
    return [(d.keep_weights, d.refresh_teacher) for d in (progress.record_eval(s, a, cfg) for s, a in curve)]


def test_length_tail_is_the_90th_percentile():
    assert length_tail(list(range(1, 11))) == 10.0   # index int(0.9 * 10) = 9 of the sorted lengths
    assert length_tail(list(range(1, 21))) == 19.0   # index 18
    assert length_tail([7]) == 7.0 and length_tail([]) == 0.0


def test_keep_best_keeps_only_a_strictly_better_evaluation():
    cfg = DistillConfig(eval_every=2, max_steps=7)
    progress = Progress()
    curve = [(0, 0.3), (2, 0.8), (4, 0.5), (6, 0.8), (7, 0.6)]
    assert evals(progress, cfg, curve) == [(True, False), (True, False), (False, False), (False, False),
                                           (False, False)]
    assert (progress.best, progress.best_step, progress.evals_since_best) == (0.8, 2, 3)
    assert [h["step"] for h in progress.history] == [0, 2, 4, 6, 7]
    assert [h["accuracy"] for h in progress.history] == [a for _, a in curve]
    progress.record_step(7, [5], generations=1, sampled_tokens=5, trained_tokens=9)
    assert progress.ends_on_another_step()  # the result is the student of step 2, not of step 7

    off = Progress()
    assert evals(off, DistillConfig(eval_every=2, keep_best=False), curve) == [(False, False)] * 5
    assert off.best_step == 2  # still tracked (the summary reports it), but no weights are kept


def test_the_best_at_the_last_step_is_the_last_student():
    progress = Progress()
    evals(progress, DistillConfig(eval_every=1), [(0, 0.2), (1, 0.4)])
    progress.record_step(1, [5], generations=1, sampled_tokens=5, trained_tokens=9)
    assert not progress.ends_on_another_step()


def test_evaluations_fall_every_n_steps_and_after_the_last():
    assert [s for s in range(1, 6) if Progress().eval_due(s, DistillConfig(eval_every=2, max_steps=5))] == [2, 4, 5]
    assert [s for s in range(1, 7) if Progress().eval_due(s, DistillConfig(eval_every=3, max_steps=6))] == [3, 6]
    assert not any(Progress().eval_due(s, DistillConfig(max_steps=5)) for s in range(1, 6))


def test_plateau_refreshes_after_patience_evaluations_without_a_gain():
    cfg = DistillConfig(eval_every=1, sync_patience=2)
    progress = Progress()
    # best 0.5; 0.4, 0.4 (2 without gain: refresh, count restarts); 0.6 best; 0.6, 0.6 (refresh); 0.6
    accuracies = [0.5, 0.4, 0.4, 0.6, 0.6, 0.6, 0.6]
    decisions = evals(progress, cfg, enumerate(accuracies))
    assert [refresh for _, refresh in decisions] == [False, False, True, False, False, True, False]
    assert [keep for keep, _ in decisions] == [True, False, False, True, False, False, False]
    assert progress.syncs == [2, 5] and progress.teacher_version == 2
    # an evaluation is recorded with the teacher it was trained against, before its own refresh
    assert [h["teacher_version"] for h in progress.history] == [0, 0, 0, 1, 1, 1, 2]
    assert progress.evals_since_best == 1


def test_gated_refresh_needs_a_gain_over_the_last_refresh_and_a_tail_that_held():
    # margin and accuracies in eighths and sixteenths, so that the comparisons are exact in binary
    cfg = DistillConfig(eval_every=1, refresh_margin=0.125, refresh_tail_growth=0.1)
    progress = Progress()
    assert evals(progress, cfg, [(0, 0.5)]) == [(True, False)]
    assert progress.refresh == RefreshEvidence(accuracy=0.5, tail=None, lengths=[])  # the teacher's own accuracy

    progress.record_step(1, [40] * 10, generations=10, sampled_tokens=400, trained_tokens=0)
    assert progress.refresh.tail == 40.0  # the first step after a refresh: the teacher's own answers
    assert evals(progress, cfg, [(1, 0.5625)]) == [(True, False)]  # +0.0625: below the margin
    assert progress.refresh.lengths == []  # each evaluation judges the lengths since the one before

    progress.record_step(2, [40] * 8 + [42] * 2, generations=10, sampled_tokens=404, trained_tokens=0)
    assert progress.refresh.tail == 40.0  # kept: it is the teacher's, not the student's
    # +0.125 over 0.5 (the margin exactly); tail 42 <= 1.1 * 40
    assert evals(progress, cfg, [(2, 0.625)]) == [(True, True)]
    assert progress.syncs == [2] and progress.refresh.accuracy == 0.625 and progress.refresh.tail is None

    progress.record_step(3, [50] * 10, generations=10, sampled_tokens=500, trained_tokens=0)
    progress.record_step(4, [50] * 5 + [60] * 5, generations=10, sampled_tokens=550, trained_tokens=0)
    assert progress.refresh.tail == 50.0
    # a gain of 0.25, but the tail of the 20 lengths since the last evaluation is 60 > 1.1 * 50
    assert evals(progress, cfg, [(4, 0.875)]) == [(True, False)]

    progress.record_step(5, [50] * 10, generations=10, sampled_tokens=500, trained_tokens=0)
    # 0.75 = 0.625 + 0.125: the gain counts from the accuracy at the last refresh, not from the best
    assert evals(progress, cfg, [(5, 0.75)]) == [(False, True)]
    assert progress.syncs == [2, 5] and progress.teacher_version == 2


def test_the_clock_refreshes_every_n_steps():
    progress = Progress()
    assert [s for s in range(1, 10) if progress.refresh_on_clock(s, DistillConfig(sync_every=3))] == [3, 6, 9]
    assert progress.syncs == [3, 6, 9] and progress.teacher_version == 3
    assert not any(Progress().refresh_on_clock(s, DistillConfig()) for s in range(1, 10))


def test_rules_together_a_clock_and_a_plateau_on_one_step_refresh_twice_and_close_the_gate():
    cfg = DistillConfig(eval_every=2, sync_every=2, sync_patience=1, refresh_margin=0.0, refresh_tail_growth=0.5)
    progress = Progress()
    assert evals(progress, cfg, [(0, 0.5)]) == [(True, False)]
    progress.record_step(1, [10] * 4, generations=4, sampled_tokens=40, trained_tokens=0)
    progress.record_step(2, [10] * 4, generations=4, sampled_tokens=40, trained_tokens=0)
    assert progress.refresh_on_clock(2, cfg)
    # 0.4 is one evaluation without a gain: the plateau refreshes again on the same step; the gate has no
    # answers of the new teacher to judge, so it stays closed
    assert evals(progress, cfg, [(2, 0.4)]) == [(False, True)]
    progress.record_step(3, [12] * 4, generations=4, sampled_tokens=48, trained_tokens=0)
    progress.record_step(4, [12] * 4, generations=4, sampled_tokens=48, trained_tokens=0)
    assert progress.refresh_on_clock(4, cfg)
    # a gain of 0.4 over the reference, but the clock has just refreshed: nothing to judge the tail on
    assert evals(progress, cfg, [(4, 0.9)]) == [(True, False)]
    assert progress.syncs == [2, 2, 4] and progress.teacher_version == 3
    assert [h["teacher_version"] for h in progress.history] == [0, 1, 3]
    assert progress.budget == Budget(generations=16, sampled_tokens=176, trained_tokens=0)


def test_progress_is_saved_as_the_checkpoint_json_and_read_back():
    cfg = DistillConfig(eval_every=1, sync_patience=1, refresh_margin=0.0)
    progress = Progress()
    evals(progress, cfg, [(0, 0.5)])
    progress.record_step(1, [30, 31, 29], generations=3, sampled_tokens=90, trained_tokens=200)
    evals(progress, cfg, [(1, 0.25)])
    saved = json.loads(json.dumps({**progress.state(), "queue": [3, 1], "rng": [3, [1, 2], None]}))
    assert Progress.from_state(saved) == progress
    # the keys, in the order Phase 2's checkpoints have always written them
    assert list(progress.state()) == ["step", "teacher_version", "syncs", "history", "best", "best_step",
                                      "evals_since_best", "refresh", "budget"]
    assert list(progress.state()["refresh"]) == ["accuracy", "tail", "lengths"]
    assert list(progress.state()["budget"]) == ["generations", "sampled_tokens", "trained_tokens"]


def test_a_checkpoint_written_before_the_budget_and_the_gate_still_resumes():
    older = {"step": 4, "teacher_version": 1, "syncs": [2], "best": 0.5, "best_step": 2, "evals_since_best": 1,
             "history": [{"step": 0, "accuracy": 0.25, "teacher_version": 0}], "queue": [], "rng": [3, [], None],
             "folder": "/runs/x/sdzero/checkpoint"}
    progress = Progress.from_state(older)
    assert (progress.step, progress.teacher_version, progress.syncs, progress.best_step) == (4, 1, [2], 2)
    assert progress.refresh == RefreshEvidence() and progress.budget == Budget()
