"""The lab's pretraining corpus: the v1, v2 and control recipes write what their docstrings say."""

import json
from dataclasses import asdict, replace
from random import Random

import pytest
import torch

from sdzero import lab
from sdzero.lab.model import PRESETS, PretrainConfig, backward_by_length, build_model, corpus_document
from sdzero.lab.task import STEP_RE, Problem, sample_problems, write_solution, written_operands
from sdzero.modeling import resolve_model_path
from sdzero.prompts import SEPARATOR, ControlPhrases
from sdzero.training import sft_step_loss

PHRASES = ControlPhrases()
PROBLEMS = sample_problems(4000, split="train", seed=0)


def attempts_and_phrases(document: str) -> tuple[list[str], list[str]]:
    parts = document.split(SEPARATOR)
    return parts[0::2], parts[1::2]


def steps(attempt: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in step) for step in STEP_RE.findall(attempt)]


def slip_share(pairs) -> float:
    """Share of carry steps (written running sum + written operand >= 10) whose result is one too many."""
    carries = [(s, d, t) for attempt in pairs for s, d, t in steps(attempt) if s + d >= 10]
    return sum(t == (s + d + 1) % 10 for s, d, t in carries) / len(carries)


def test_misreads_and_copied_operands():
    problem = Problem((3, 5, 2, 8, 6))
    misread = write_solution(problem, Random(0), misread_rate=1.0)
    assert all(d != gold for d, gold in zip(written_operands(misread), problem.digits[1:]))
    # a misread operand is summed as read: every written step is arithmetic on what it wrote
    assert all(t == (s + d) % 10 for s, d, t in steps(misread))
    copied = write_solution(problem, operands=written_operands(misread))
    assert written_operands(copied) == written_operands(misread)


def documents(preset: str):
    cfg, rng = PRESETS[preset], Random(0)
    return cfg, [(p, corpus_document(p, rng, cfg, PHRASES)) for p in PROBLEMS]


def revisions(docs):
    """(problem, attempt before "start over", attempt after it) for every start-over in the corpus."""
    for problem, document in docs:
        attempts, phrases = attempts_and_phrases(document)
        for i, phrase in enumerate(phrases):
            if phrase == PHRASES.wrong:
                yield problem, attempts[i], attempts[i + 1]


def test_v2_revisions_reread_the_problem_and_slip_less():
    cfg, docs = documents("v2")
    firsts = [attempts_and_phrases(d)[0][0] for _, d in docs]
    misread = sum(d != gold for (p, _), a in zip(docs, firsts)
                  for d, gold in zip(written_operands(a), p.digits[1:]))
    n_steps = sum(len(p.digits) - 1 for p, _ in docs)
    assert misread / n_steps == pytest.approx(cfg.misread_rate, abs=0.006)
    assert slip_share(firsts) == pytest.approx(cfg.slip_rate, abs=0.02)
    found = list(revisions(docs))
    assert len(found) > 500
    assert all(written_operands(after) == list(p.digits[1:]) for p, _, after in found)
    assert slip_share(after for _, _, after in found) == pytest.approx(cfg.revision_slip_rate, abs=0.02)
    right_after = sum(after.endswith(f"Answer: {p.answer}") for p, _, after in found) / len(found)
    right_first = sum(a.endswith(f"Answer: {p.answer}") for (p, _), a in zip(docs, firsts)) / len(docs)
    assert right_after > right_first + 0.3


def test_control_revisions_copy_the_wrong_attempt_and_slip_as_often():
    cfg, docs = documents("control")
    found = list(revisions(docs))
    assert len(found) > 500
    assert all(written_operands(after) == written_operands(before) for _, before, after in found)
    # at least one copied operand was misread by the attempt it copies, so copying is not reading
    assert any(written_operands(before) != list(p.digits[1:]) for p, before, _ in found)
    assert slip_share(after for _, _, after in found) == pytest.approx(cfg.slip_rate, abs=0.03)
    # the control differs from v2 only in its revisions
    v2 = PRESETS["v2"]
    assert replace(cfg, revision_slip_rate=v2.revision_slip_rate, revision_reads_problem=True) == v2


def test_long_documents_restate_then_check_and_reach_the_teachers_positions():
    cfg, docs = documents("v2")
    wrong_first, checked = 0, []
    for problem, document in docs:
        attempts, phrases = attempts_and_phrases(document)
        if attempts[0].endswith(f"Answer: {problem.answer}"):
            continue
        wrong_first += 1
        restated = next((i for i, phrase in enumerate(phrases) if phrase != PHRASES.correct), len(phrases))
        if restated >= 1:  # only a long document restates a wrong first attempt
            assert restated >= 2 and attempts[:restated + 1] == [attempts[0]] * (restated + 1)
            assert phrases[restated] == PHRASES.wrong  # and then it is checked
            checked.append(document)
    assert len(checked) / wrong_first == pytest.approx(cfg.long_document_rate, abs=0.02)
    # careful attempts after "start over" sit as deep as the Phase 2 teacher reads: x, a two-attempt answer
    # (~130 tokens, ~350 characters), the phrase and the answer again
    assert max(document.rindex(PHRASES.wrong) for document in checked) > 800
    assert cfg.max_position_embeddings >= 1024


def test_v1_corpus_is_the_shipped_models():
    """v1 writes the corpus the shipped `lab` model was trained on: a plain rewrite of that recipe."""
    cfg, docs = documents("v1")
    rng = Random(0)
    for problem, document in docs:
        parts = [write_solution(problem, rng, cfg.slip_rate)]
        for _ in range(cfg.max_attempts - 1):
            right = parts[-1].endswith(f"Answer: {problem.answer}")
            if right and rng.random() < cfg.rephrase_rate:
                parts += [PHRASES.correct, parts[-1]]
            elif not right and rng.random() < cfg.start_over_rate:
                parts += [PHRASES.wrong, write_solution(problem, rng, cfg.slip_rate)]
            else:
                break
        assert document == SEPARATOR.join(parts)
    assert PRESETS["v1"] == PretrainConfig()


def test_backward_by_length_equals_one_full_batch():
    from sdzero.lab.model import build_tokenizer

    tokenizer = build_tokenizer([write_solution(p) for p in PROBLEMS[:200]], vocab_size=64)
    torch.manual_seed(0)
    model = build_model(tokenizer, PretrainConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    rng = Random(1)
    batch = [([rng.randrange(3, 40) for _ in range(rng.randint(2, 6))],
              [rng.randrange(3, 40) for _ in range(rng.randint(1, 30))]) for _ in range(10)]
    loss = backward_by_length(model, batch, 3, tokenizer.pad_token_id)
    by_length = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = sft_step_loss(model, [batch], tokenizer.pad_token_id)[0]
    full.backward()
    assert loss == pytest.approx(full.item(), rel=1e-5)
    for a, p in zip(by_length, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(lab.LAB_MODELS))
def test_each_shipped_lab_model_is_its_presets(name):
    """Every shipped lab model was trained by `sdzero lab pretrain --preset P` with P's recipe as it is today,
    fits the teacher contexts its recipe promises, and stays small."""
    from transformers import AutoConfig

    folder, preset = lab.LAB_MODELS[name]
    recorded = json.loads((folder / "lab_pretrain.json").read_text())["recipe"]
    # v1 was trained before the v2 fields existed; their v1 values write v1's corpus (test above)
    assert recorded == {key: value for key, value in asdict(PRESETS[preset]).items() if key in recorded}
    assert preset == "v1" or recorded.keys() == asdict(PRESETS[preset]).keys()
    assert AutoConfig.from_pretrained(folder).max_position_embeddings == PRESETS[preset].max_position_embeddings
    assert sum(path.stat().st_size for path in folder.iterdir()) <= 10 * 2**20
    assert resolve_model_path(name) == str(folder)


def test_a_missing_lab_model_names_the_command_that_builds_it(monkeypatch, tmp_path):
    monkeypatch.setitem(lab.LAB_MODELS, "lab-control", (tmp_path / "nowhere", "control"))
    with pytest.raises(FileNotFoundError, match="sdzero lab pretrain --preset control --out .*nowhere"):
        resolve_model_path("lab-control")
