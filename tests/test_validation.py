"""The validation set: disjoint from N1, N2 and the held-out set for every kind of data, the same for every run
seed; Phase 2's curve and keep-best read only validation problems; report.json says how the SD-Zero model was
chosen; `compare.selection` picks every method's best validation point the same way."""

import json
from pathlib import Path

import pytest
import torch

from sdzero import pipeline, stages
from sdzero.cli import main
from sdzero.compare import BestOnValidation, load_compare_config
from sdzero.config import load_config
from sdzero.data import DataConfig, load_problem_sets

CI_CONFIG = Path(__file__).parent.parent / "configs" / "compare_ci.yaml"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def math_rows(n, prefix="q"):
    return [{"id": f"{prefix}{i}", "problem": f"{prefix} problem {i}", "answer": str(i)} for i in range(n)]


def ids(problems):
    return [p["id"] for p in problems]


def data_kinds(tmp_path):
    """(data, task) of every kind of data: a file pool, a file with a separate eval file, a row source
    (HumanEval), a reasoning-gym generator and the built-in lab task."""
    pool = write_jsonl(tmp_path / "pool.jsonl", math_rows(40))
    train = write_jsonl(tmp_path / "train.jsonl", math_rows(30, "t"))
    evals = write_jsonl(tmp_path / "eval.jsonl", math_rows(10, "e"))
    return {
        "file": (DataConfig(path=pool), "math"),
        "eval file": (DataConfig(path=train, eval_path=evals), "math"),
        "humaneval": (DataConfig(source="humaneval"), "code"),
        "reasoning-gym": (DataConfig(source="reasoning-gym:chain_sum", options={"min_terms": 2, "max_terms": 2}),
                          "reasoning-gym"),
        "lab": (DataConfig(), "lab"),
    }


@pytest.mark.parametrize("kind", ["file", "eval file", "humaneval", "reasoning-gym", "lab"])
def test_four_sets_are_disjoint_and_validation_is_the_same_for_every_run_seed(tmp_path, kind):
    data, task = data_kinds(tmp_path)[kind]
    runs = {seed: load_problem_sets(data, task, 8, 10, 6, seed, record_dir=tmp_path / f"run{seed}", n_validation=5)
            for seed in (0, 1)}
    for seed, sets in runs.items():
        sizes = [len(sets.n1), len(sets.n2), len(sets.validation), len(sets.held_out)]
        assert sizes == [8, 10, 5, 6], (kind, seed)
        every = ids(sets.n1) + ids(sets.n2) + ids(sets.validation) + ids(sets.held_out)
        assert len(set(every)) == len(every), (kind, seed)  # no problem is in two sets
        record = json.loads((tmp_path / f"run{seed}" / "split.json").read_text())
        assert record["validation"] == ids(sets.validation)
    assert ids(runs[0].validation) == ids(runs[1].validation)  # fixed, like the held-out set
    assert ids(runs[0].held_out) == ids(runs[1].held_out)
    assert ids(runs[0].n1 + runs[0].n2) != ids(runs[1].n1 + runs[1].n2)  # training moves with the seed


def test_lab_validation_comes_from_the_training_side():
    from sdzero.lab.task import Problem, is_eval_problem

    sets = load_problem_sets(DataConfig(), "lab", 0, 0, 0, 0, n_validation=200)
    assert not any(is_eval_problem(Problem.from_id(p["id"]).digits) for p in sets.validation)


def test_validation_problems_come_out_of_the_pool_not_out_of_n1_and_n2(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "pool.jsonl", math_rows(24)))
    sets = load_problem_sets(data, "math", 8, 8, 4, 0, n_validation=4)
    assert (len(sets.n1), len(sets.n2)) == (8, 8)
    with pytest.raises(ValueError, match=r"the problem pool has 24 problems; requested n_phase1=8 \+ n_phase2=8 \+ "
                                         r"n_validation=5 \+ n_eval=4 = 25"):
        load_problem_sets(data, "math", 8, 8, 4, 0, n_validation=5)
    gym = DataConfig(source="reasoning-gym:chain_sum", options={"min_terms": 2, "max_terms": 2}, size=24)
    with pytest.raises(ValueError, match=r"n_validation=5 \+ n_eval=4 = 25 problems"):
        load_problem_sets(gym, "reasoning-gym", 8, 8, 4, 0, n_validation=5)


def test_a_split_from_before_validation_sets_reads_for_its_held_out_set_and_refuses_phase_2(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "pool.jsonl", math_rows(30)))
    sets = load_problem_sets(data, "math", 8, 8, 4, 0, record_dir=tmp_path)
    record = json.loads((tmp_path / "split.json").read_text())
    del record["validation"]  # as an older sdzero wrote it
    (tmp_path / "split.json").write_text(json.dumps(record))
    again = load_problem_sets(data, "math", 8, 8, 4, 0, record_dir=tmp_path)  # `sdzero eval` asks for none
    assert ids(again.held_out) == ids(sets.held_out)
    with pytest.raises(ValueError, match=r"split.json: the run's split has no validation set .* pass --restart"):
        load_problem_sets(data, "math", 8, 8, 4, 0, record_dir=tmp_path, n_validation=4)


def test_a_different_validation_size_is_refused_against_the_recorded_split(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "pool.jsonl", math_rows(30)))
    load_problem_sets(data, "math", 8, 8, 4, 0, record_dir=tmp_path, n_validation=4)
    with pytest.raises(ValueError, match=r"the run's validation set has 4 problems; this command asks for 3"):
        load_problem_sets(data, "math", 8, 8, 4, 0, record_dir=tmp_path, n_validation=3)


def test_validation_size_defaults_to_the_curve_size_and_is_checked():
    cfg = load_config(None, ["eval.curve_problems=7"])
    assert cfg.eval.n_validation() == 7
    assert load_config(None, ["eval.validation_problems=12"]).eval.n_validation() == 12
    with pytest.raises(ValueError, match=r"eval.validation_problems must be >= 1, got 0"):
        load_config(None, ["eval.validation_problems=0"])


def test_selection_says_how_the_model_was_chosen():
    cfg = load_config(None, ["eval.curve_problems=4", "eval.curve_k=2"])
    history = [{"step": 0, "accuracy": 0.1}, {"step": 5, "accuracy": 0.4}, {"step": 10, "accuracy": 0.3}]
    assert (pipeline.selection(cfg, history, 5, keep_best=True)
            == "best of 3 validation evaluations (avg@2 on 4 validation problems): step 5")
    assert pipeline.selection(cfg, history, 5, keep_best=False) == "last step"
    assert pipeline.selection(cfg, [], None, keep_best=True) == "last step"


TINY = ["n_phase1=16", "n_phase2=8", "sampling.max_new_tokens=100", "srt.epochs=1", "srt.batch_size=16",
        "distill.prompts_per_step=4", "distill.micro_batch_size=4", "distill.max_steps=2", "distill.eval_every=1",
        "distill.keep_best=true", "eval.n_problems=4", "eval.k=1", "eval.curve_problems=3", "eval.curve_k=1",
        "eval.revise_problems=0"]


@pytest.mark.slow
def test_the_curve_and_keep_best_see_only_validation_problems(tmp_path, monkeypatch):
    from sdzero.cli import DEMO_CONFIG

    seen = []  # (problem ids, k) of every evaluation the pipeline makes, passed on to the real one
    real_evaluate = pipeline.evaluate

    def recording_evaluate(generator, problems, verifier, **kwargs):
        seen.append((ids(problems), kwargs["k"]))
        return real_evaluate(generator, problems, verifier, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", recording_evaluate)  # the held-out evaluations
    monkeypatch.setattr(stages, "evaluate", recording_evaluate)  # Phase 2's curve
    cfg = load_config(DEMO_CONFIG, TINY)
    report = pipeline.run_pipeline(cfg, tmp_path, progress=False, log=lambda *_: None)
    split = json.loads((tmp_path / "split.json").read_text())
    curve_calls = [problem_ids for problem_ids, _ in seen if problem_ids != split["held_out"]]
    assert len(curve_calls) == 3  # steps 0, 1 and 2 of Phase 2
    assert all(problem_ids == split["validation"][:3] for problem_ids in curve_calls)
    assert len(seen) - len(curve_calls) == 3  # base, srt and sdzero on the held-out set, nothing else
    assert not set(split["validation"]) & set(split["held_out"])
    saved = json.loads((tmp_path / "report.json").read_text())
    best = json.loads((tmp_path / "sdzero" / "summary.json").read_text())["best_step"]
    assert saved["selection"] == report["selection"] == (
        f"best of 3 validation evaluations (avg@1 on 3 validation problems): step {best}")


@pytest.mark.slow
def test_compare_selection_is_checked_and_reported(tmp_path):
    with pytest.raises(ValueError, match=r"compare.selection must be one of none, validation, got 'best'"):
        load_compare_config(CI_CONFIG, ["compare.selection=best"])
    out = tmp_path / "compare"
    assert main(["compare", "--config", str(CI_CONFIG), "--out", str(out), "--quiet", "--methods", "rft",
                 "--set", "compare.selection=validation"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["selection"].startswith("validation: each method's model at its best validation curve point")
    assert "validation problems" in report["curve_metric"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    rft = next(r for r in rows if r["method"] == "rft")
    curve = rft["summary"]["curve"]
    selected = rft["summary"]["selected"]
    assert selected["validation_accuracy"] == max(p["accuracy"] for p in curve)
    assert curve[selected["point"]]["accuracy"] == selected["validation_accuracy"]
    assert "selection: validation" in (out / "report.md").read_text()


def test_best_on_validation_restores_the_weights_of_the_best_point(lab_model_and_tokenizer):
    import copy

    model = copy.deepcopy(lab_model_and_tokenizer[0])
    accuracies = iter([0.2, 0.5, 0.5, 0.1])  # the first of the highest points is the one kept
    tracker = BestOnValidation(lambda m: next(accuracies))
    weights = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        tracker(model)
    curve = [{"generations": g, "accuracy": a} for g, a in zip((10, 20, 30, 40), (0.2, 0.5, 0.5, 0.1))]
    chosen = tracker.restore(model, curve)
    assert chosen == {"point": 1, "generations": 20, "validation_accuracy": 0.5}
    assert all(torch.equal(p, weights[1][n]) for n, p in model.named_parameters())
