"""`sdzero compare` end to end at CI size (real lab model, real TRL trainers, real files), the budget
rule on those real runs, the budget counters of the stages, and the curve arithmetic."""

import copy
import json
from pathlib import Path

import pytest

from sdzero.budget import Budget, relative_gap
from sdzero.cli import main
from sdzero.compare import first_point_at, load_compare_config, markdown_table

CI_CONFIG = Path(__file__).parent.parent / "configs" / "compare_ci.yaml"


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert main(["compare", "--config", str(CI_CONFIG), "--out", str(out), "--quiet"]) == 0
    return out


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_report_has_every_method_with_its_budget(ci_run):
    report = json.loads((ci_run / "report.json").read_text())
    assert report["metric"] == "avg@2" and report["k"] == 2 and report["seeds"] == [0]
    assert 0.0 <= report["base"]["accuracy"] <= 1.0
    assert set(report["methods"]) == {"sdzero", "rft", "grpo", "sdft", "phase2"}
    for name, m in report["methods"].items():
        for key in ("accuracy", "accuracy_std", "generations", "sampled_tokens", "trained_tokens", "wall_seconds"):
            assert isinstance(m[key], (int, float)), (name, key)
        assert 0.0 <= m["accuracy"] <= 1.0 and m["wall_seconds"] > 0
        assert m["sampled_tokens"] >= m["generations"] > 0 and m["trained_tokens"] > 0
        # the curve starts at the base model and ends at the method's final budget
        assert m["curve"][0]["generations"] == 0
        assert m["curve"][-1]["generations"] == m["generations"]
        # every point carries the wall time billed by then, which grows along the run up to the method's
        walls = [point["wall_seconds"] for point in m["curve"]]
        assert walls[0] == 0 and walls == sorted(walls) and walls[-1] <= m["wall_seconds"], (name, walls)
        assert walls[-1] > 0.5 * m["wall_seconds"], (name, walls)  # the last point comes after nearly all of it
    assert "| sdzero |" in (ci_run / "report.md").read_text()
    assert (ci_run / "sample_efficiency.png").stat().st_size > 1000


@pytest.mark.slow
def test_budgets_are_matched_within_five_percent_on_the_real_runs(ci_run):
    rows = read_lines(ci_run / "results.jsonl")
    sdzero = next(r for r in rows if r["method"] == "sdzero")
    # SD-Zero: 16 Phase 1 problems x (1 answer + 3 revisions) + 2 Phase 2 steps x 8 prompts
    assert sdzero["generations"] == 16 * 4 + 2 * 8
    for row in rows:
        if row["method"] in ("rft", "grpo", "sdft"):
            assert row["target_generations"] == sdzero["generations"]
            assert relative_gap(row["generations"], sdzero["generations"]) <= 0.05, row["method"]
            assert row["generations"] == row["questions"] * 4  # every question got G = 4 samples


@pytest.mark.slow
def test_phase2_alone_repeats_sdzeros_phase2_from_the_base_model(ci_run):
    rows = {r["method"]: r for r in read_lines(ci_run / "results.jsonl")}
    ablation, sdzero = rows["phase2"], rows["sdzero"]
    assert ablation["summary"]["phase2_steps"] == sdzero["summary"]["phase2_steps"] == 2
    # only Phase 2's rollouts, unmatched: 2 steps x 8 prompts, against SD-Zero's 64 + 16
    assert ablation["generations"] == 16 and ablation["target_generations"] is None
    assert [p["step"] for p in ablation["summary"]["curve"]] == [0, 1, 2]
    assert (ci_run / "seed0" / "phase2" / "phase2" / "metrics.jsonl").exists()
    assert not (ci_run / "seed0" / "phase2" / "phase1").exists()


@pytest.mark.slow
def test_base_srt_and_sdzero_are_measured_by_generate_then_revise(ci_run):
    report = json.loads((ci_run / "report.json").read_text())
    assert [(r["model"], r["seed"]) for r in report["revise"]] == [("base", 0), ("srt", 0), ("sdzero", 0)]
    for r in report["revise"]:
        assert r["n_answers"] == 4 and 0.0 <= r["revised_accuracy"] <= 1.0
        wrong = round((1 - r["initial_accuracy"]) * 4)
        assert r["n_wrong"] == wrong
    for name in ("base", "srt", "sdzero"):
        samples = read_lines(ci_run / "seed0" / "eval" / f"{name}_revise.jsonl")
        assert len(samples) == 4 and all("revision" in s for s in samples)
    assert "| srt | 0 | 4 |" in (ci_run / "report.md").read_text()


@pytest.mark.slow
def test_metrics_record_cumulative_budget_per_step(ci_run):
    for method in ("sdzero", "rft", "grpo", "sdft"):
        steps = [m for m in read_lines(ci_run / "seed0" / method / "metrics.jsonl") if "loss" in m]
        assert steps, method
        for key in ("budget/generations", "budget/sampled_tokens", "budget/trained_tokens"):
            values = [m[key] for m in steps]
            assert values == sorted(values) and values[-1] > 0, (method, key)
    sdzero_steps = [m for m in read_lines(ci_run / "seed0" / "sdzero" / "metrics.jsonl") if "loss" in m]
    assert sdzero_steps[0]["budget/generations"] == 64  # Phase 1 already spent
    assert sdzero_steps[-1]["budget/generations"] == 80
    # collection's per-problem counts add up to its summary
    attempts = read_lines(ci_run / "seed0" / "sdzero" / "phase1" / "attempts.jsonl")
    assert sum(a["generations"] for a in attempts) == 64


@pytest.mark.slow
def test_rerun_resumes_without_training_again(ci_run, capsys):
    before = (ci_run / "results.jsonl").read_text()
    assert main(["compare", "--config", str(CI_CONFIG), "--out", str(ci_run), "--quiet"]) == 0
    assert (ci_run / "results.jsonl").read_text() == before


@pytest.mark.slow
def test_a_rerun_with_other_settings_recomputes_and_labels_only_what_it_measured(ci_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(ci_run, out)
    before = read_lines(out / "results.jsonl")
    assert main(["compare", "--config", str(CI_CONFIG), "--out", str(out), "--quiet", "--methods", "rft",
                 "--set", "compare.rft.lr=0.01", "--set", "eval.k=1"]) == 0
    rows = read_lines(out / "results.jsonl")
    added = rows[len(before):]
    assert [r["method"] for r in added] == ["base", "rft"], "eval.k shapes base and rft: both recomputed"
    assert all(r["settings"]["run"]["eval"]["k"] == 1 for r in added)
    assert added[1]["settings"]["method"]["lr"] == 0.01
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "avg@1" and set(report["methods"]) == {"rft"}
    assert report["methods"]["rft"]["accuracy_per_seed"] == [added[1]["accuracy"]]
    assert (out / "stale").is_dir()  # the old rft files, moved aside
    # the same command again reuses both results
    assert main(["compare", "--config", str(CI_CONFIG), "--out", str(out), "--quiet", "--methods", "rft",
                 "--set", "compare.rft.lr=0.01", "--set", "eval.k=1"]) == 0
    assert len(read_lines(out / "results.jsonl")) == len(rows)


def test_a_budget_that_cannot_be_matched_is_refused_before_training(tmp_path, capsys):
    # GRPO trains 4 prompts x 4 rollouts = 16 generations per step: 72 falls between 64 and 80 (11% off).
    code = main(["compare", "--config", str(CI_CONFIG), "--out", str(tmp_path), "--quiet", "--methods", "grpo",
                 "--budget", "72"])
    assert code == 2
    err = capsys.readouterr().err
    assert "grpo would spend 64 generations against the matched budget of 72" in err
    assert not (tmp_path / "seed0" / "grpo" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("compare.methods=sdzero,ppo", "unknown method(s) ppo"),
    ("compare.seeds=0", "compare.seeds must be >= 1"),
    ("compare.grpo.nonsense=1", "unknown key 'compare.grpo.nonsense'"),
])
def test_bad_compare_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_compare_config(CI_CONFIG, [override])


def test_budget_counts_like_a_plain_tally():
    budget = Budget()
    samples = [("q1", 5), ("q1", 7), ("q2", 3)]
    for qid, length in samples:
        budget.sampled([qid], [length])
    budget.trained(11)
    with budget.excluded():
        pass
    summary = budget.summary()
    assert summary["questions"] == len({q for q, _ in samples})
    assert summary["generations"] == len(samples)
    assert summary["sampled_tokens"] == sum(n for _, n in samples)
    assert summary["trained_tokens"] == 11
    with pytest.raises(ValueError, match="2 question ids for 1 responses"):
        budget.sampled(["a", "b"], [1])


def test_the_level_is_reached_at_the_first_measured_point_at_or_above_it():
    curve = [{"generations": 0, "accuracy_mean": 0.5}, {"generations": 100, "accuracy_mean": 0.6},
             {"generations": 300, "accuracy_mean": 0.8}, {"generations": 400, "accuracy_mean": 0.7}]
    assert first_point_at(curve, 0.5)["generations"] == 0
    assert first_point_at(curve, 0.7)["generations"] == 300
    assert first_point_at(curve, 0.9) is None


def test_report_table_gives_generations_and_wall_time_to_reach_grpo_final():
    def method(reach_generations, reach_wall):
        return {"accuracy": 0.9, "accuracy_std": 0.0, "generations": 400, "sampled_tokens": 9000,
                "trained_tokens": 20000, "wall_seconds": 120.0, "mean_length": 30.0,
                "generations_to_reach_grpo_final": reach_generations,
                "wall_seconds_to_reach_grpo_final": reach_wall}
    report = {"k": 8, "base": {"accuracy": 0.5, "accuracy_std": 0.0}, "seeds": [0], "n_eval_problems": 10,
              "metric": "avg@8", "curve_metric": "avg@2",
              "methods": {"sdzero": method(300, 95.4), "rft": method(None, None), "grpo": method(400, 120.0),
                          "sdft": method(200, None)}}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[-2:] for line in markdown_table(report).splitlines()}
    assert rows["sdzero"] == ["300", "95 |"]
    assert rows["rft"] == ["not reached", " |"]
    assert rows["sdft"] == ["200", "not recorded |"]  # a result from before curve points had wall times


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "sdft"])
def test_trl_baselines_sample_with_our_generator(method, lab_model_and_tokenizer, tmp_path, monkeypatch):
    """GRPO's and SDFT's completions come from sdzero's `Generator`, as SD-Zero's and RFT's do, so wall
    times compare methods and not decoding loops: every completion the budget counts is one it drew."""
    from sdzero.baselines.grpo import GRPOBaselineConfig, train_grpo
    from sdzero.baselines.sdft import SDFTBaselineConfig, train_sdft
    from sdzero.generation import Generator, SamplingConfig
    from sdzero.lab import problem_sets
    from sdzero.tasks.lab import lab_reward

    drawn = []
    sample = Generator.sample

    def recording(self, contexts, n=1, **kwargs):
        samples = sample(self, contexts, n, **kwargs)
        drawn.extend(len(s.ids) for per_context in samples for s in per_context)
        return samples

    monkeypatch.setattr(Generator, "sample", recording)
    model, tokenizer = lab_model_and_tokenizer
    model = copy.deepcopy(model)
    _, questions, _ = problem_sets(0, 4, 0, seed=1)
    sampling = SamplingConfig(max_new_tokens=32)
    shape = dict(prompts_per_step=2, num_generations=2, micro_batch_size=4)
    budget = Budget()
    if method == "grpo":
        train_grpo(model, tokenizer, questions, lab_reward, sampling, GRPOBaselineConfig(**shape), budget,
                   out_dir=tmp_path, progress=False)
    else:
        train_sdft(model, tokenizer, questions, sampling, SDFTBaselineConfig(**shape), budget, out_dir=tmp_path,
                   progress=False)
    assert budget.generations == len(drawn) == 8  # 4 questions x 2 completions, one pass
    assert budget.sampled_tokens == sum(drawn)
