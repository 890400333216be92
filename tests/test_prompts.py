"""The one token layout shared by Phase 1 and Phase 2, on the real lab tokenizer."""

import pytest
import torch

from sdzero.lab.task import Problem, write_solution
from sdzero.prompts import (CONTROL_PRESETS, ControlPhrases, bridge_ids, check_prompt_room, distill_layout,
                            effective_system_prompt, end_of_turn_ids, generator_prompt_ids, reviser_context_ids,
                            strip_end_of_turn, template_system_prompt)


def test_control_phrases_follow_the_reward():
    phrases = ControlPhrases()
    assert phrases.for_reward(1.0) == "Let me rephrase the above solution."
    assert phrases.for_reward(0.0) == "Wait, this response is not correct, let me start over."
    assert phrases.bridge(0.0) == "\n\nWait, this response is not correct, let me start over.\n\n"
    assert ControlPhrases.preset("olmo").for_reward(0.0) == "Wrong. I need to redo all."
    assert ControlPhrases.preset("qwen").for_reward(0.0) == "Wait, this response is wrong. Let me correct it."
    assert {ControlPhrases.preset(name).correct for name in CONTROL_PRESETS} == {phrases.correct}
    with pytest.raises(ValueError, match="unknown control-phrase preset 'gpt'"):
        ControlPhrases.preset("gpt")


def test_generator_prompt_is_the_chat_template_with_generation_prompt(lab_tokenizer):
    ids = generator_prompt_ids(lab_tokenizer, "Running sum mod 10 of 1 2 3")
    text = lab_tokenizer.decode(ids)
    assert text == "<|im_start|>user\nRunning sum mod 10 of 1 2 3<|im_end|>\n<|im_start|>assistant\n"


def test_reviser_context_continues_the_same_assistant_turn(lab_tokenizer):
    tok = lab_tokenizer
    eot = end_of_turn_ids(tok)
    prompt = generator_prompt_ids(tok, "Running sum mod 10 of 1 2 3")
    answer = tok.encode("1+2=3, 3+3=6. Answer: 6", add_special_tokens=False) + [tok.eos_token_id]
    context = reviser_context_ids(prompt, answer, bridge_ids(tok, ControlPhrases(), 1.0), eot)
    text = tok.decode(context)
    assert text.endswith("Answer: 6\n\nLet me rephrase the above solution.\n\n")
    assert text.count("<|im_end|>") == 1  # only the user turn's end: the assistant turn stays open
    assert text.count("<|im_start|>assistant") == 1


@pytest.mark.parametrize("length", [1, 2, 5, 17])
@pytest.mark.parametrize("with_eos", [True, False])
@pytest.mark.parametrize("reward", [0.0, 1.0])
@pytest.mark.parametrize("keeps_end", [False, True])
def test_student_and_teacher_predict_the_same_token_at_every_position(lab_tokenizer, length, with_eos, reward,
                                                                      keeps_end):
    tok = lab_tokenizer
    eot = end_of_turn_ids(tok)
    prompt = generator_prompt_ids(tok, "Running sum mod 10 of 4 4 4 4")
    body = tok.encode("4+4=8, 8+4=2, 2+4=6. Answer: 6 and some more words", add_special_tokens=False)[:length]
    end = [tok.eos_token_id] if with_eos else []
    response = body + end
    bridge = bridge_ids(tok, ControlPhrases(), reward)
    layout = distill_layout(prompt, response, bridge, eot, first_copy_keeps_end=keeps_end)
    assert layout.n_targets == len(response)
    for t in range(len(response)):
        # logits at position p predict token p + 1 of the same sequence
        assert layout.student_ids[layout.student_positions[t] + 1] == response[t]
        assert layout.teacher_ids[layout.teacher_positions[t] + 1] == response[t]
    # the first copy has no end-of-turn token unless asked to keep the one the response ended with; the second
    # copy keeps the response exactly
    first_copy = body + (end if keeps_end else [])
    first_copy_end = len(prompt) + len(first_copy)
    assert layout.teacher_ids[:first_copy_end] == prompt + first_copy
    assert layout.teacher_ids[first_copy_end:first_copy_end + len(bridge)] == bridge
    assert layout.teacher_ids[first_copy_end + len(bridge):] == response
    ends_in_context = sum(t in eot for t in layout.teacher_ids[len(prompt):first_copy_end + len(bridge)])
    assert ends_in_context == (1 if keeps_end and with_eos else 0)


def test_layout_matches_a_real_forward_pass(lab_model_and_tokenizer):
    """Gathered logits from the two real inputs line up: identical contexts give identical logits."""
    model, tok = lab_model_and_tokenizer
    eot = end_of_turn_ids(tok)
    problem = Problem((1, 2, 3, 9, 4, 4))
    prompt = generator_prompt_ids(tok, problem.text)
    response = tok.encode(write_solution(problem), add_special_tokens=False) + [tok.eos_token_id]
    layout = distill_layout(prompt, response, bridge_ids(tok, ControlPhrases(), 1.0), eot)
    with torch.no_grad():
        student = model(torch.tensor([layout.student_ids])).logits[0, layout.student_positions]
        teacher = model(torch.tensor([layout.teacher_ids])).logits[0, layout.teacher_positions]
    targets = torch.tensor(response)
    # Both rows predict the same targets: the teacher (who has seen the answer) is more sure of them.
    student_lp = student.log_softmax(-1)[torch.arange(len(response)), targets]
    teacher_lp = teacher.log_softmax(-1)[torch.arange(len(response)), targets]
    assert teacher_lp.mean() > student_lp.mean()


def test_overflow_cuts_only_the_second_copy_and_masks_what_cannot_fit():
    eot = {99}
    prompt, bridge = [1, 2, 3], [7, 8]
    response = list(range(10, 30)) + [99]  # 20 tokens and the end of turn
    first_copy = list(range(10, 30))
    layout = distill_layout(prompt, response, bridge, eot, max_length=3 + 20 + 2 + 6)
    # the teacher reads the whole first answer, as the reviser did in Phase 1; only the loss positions are cut
    assert layout.truncated and layout.n_targets == 6
    assert layout.teacher_ids == prompt + first_copy + bridge + list(range(10, 16))
    assert layout.student_ids == prompt + list(range(10, 16))
    for t in range(6):
        assert layout.teacher_ids[layout.teacher_positions[t] + 1] == layout.student_ids[layout.student_positions[t] + 1]
    assert distill_layout(prompt, response, bridge, eot, max_length=3 + 20 + 2 + 6, overflow="mask") is None
    # the first copy alone leaves no room for a target
    assert distill_layout(prompt, response, bridge, eot, max_length=3 + 20 + 2) is None
    whole = distill_layout(prompt, response, bridge, eot, max_length=3 + 20 + 2 + 21)
    assert not whole.truncated and whole.n_targets == 21
    with pytest.raises(ValueError, match="overflow"):
        distill_layout(prompt, response, bridge, eot, overflow="cut")


def test_strip_end_of_turn_drops_everything_after_the_end():
    assert strip_end_of_turn([5, 6, 99, 7], {99}) == [5, 6]
    assert strip_end_of_turn([5, 6], {99}) == [5, 6]


# ------------------------------------------------------------------------------------------
# The system turn the prompts actually carry, and prompts past the model's positions

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.slow
def test_a_template_that_adds_its_own_system_turn_is_found_and_reproduced(smollm2_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert template_system_prompt(tokenizer) == SMOLLM_SYSTEM
    assert effective_system_prompt(tokenizer, None) == SMOLLM_SYSTEM
    assert effective_system_prompt(tokenizer, "Be brief.") == "Be brief."
    # the recorded message is exactly what the template put there: stating it lays out the same tokens
    problem = "What is 3 + 4?"
    assert generator_prompt_ids(tokenizer, problem, SMOLLM_SYSTEM) == generator_prompt_ids(tokenizer, problem)
    assert SMOLLM_SYSTEM in tokenizer.decode(generator_prompt_ids(tokenizer, problem))


def test_a_template_without_a_default_system_turn_records_none(lab_tokenizer):
    assert template_system_prompt(lab_tokenizer) is None
    assert effective_system_prompt(lab_tokenizer, None) is None
    assert effective_system_prompt(lab_tokenizer, "") is None
    assert effective_system_prompt(lab_tokenizer, "Be brief.") == "Be brief."


def test_a_prompt_that_fills_the_models_positions_is_refused_naming_it(lab_tokenizer):
    short = {"id": "short", "problem": "Running sum mod 10 of 1 2 3"}
    long = {"id": "long-7", "problem": " ".join(["1 2 3"] * 200)}
    length = len(generator_prompt_ids(lab_tokenizer, long["problem"]))
    check_prompt_room(lab_tokenizer, {"N1": [short, long]}, None, length + 1)  # room for one answer token
    check_prompt_room(lab_tokenizer, {"N1": [short, long]}, None, None)  # a model that declares no limit
    with pytest.raises(ValueError, match=f"N2 problem 'long-7': its prompt is {length:,} tokens, the model has "
                                         f"{length:,} positions \\(no room for an answer\\)"):
        check_prompt_room(lab_tokenizer, {"N1": [short], "N2": [short, long]}, None, length)
    # the system prompt counts: it is part of every prompt
    with pytest.raises(ValueError, match="held-out problem 'long-7'"):
        check_prompt_room(lab_tokenizer, {"held-out": [long]}, "Be brief.", length + 1)
