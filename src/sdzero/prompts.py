"""Control phrases and the one place where generator, reviser and teacher token layouts are built.

Phase 1 (collection and SRT) and Phase 2 (the teacher context) both call the functions below, so
the two phases can never lay tokens out differently. All layouts work on token ids, not text:
responses are kept exactly as the model sampled them, and the control phrase is appended as its
own token ids, so the t-th token of the teacher's second copy is always the t-th token of y.

    generator:  prompt(x)                                   [chat template, generation prompt on]
    reviser:    prompt(x) + y - eot + sep + P_r + sep       [same assistant turn, y without its end]
    teacher:    prompt(x) + y - eot + sep + P_r + sep + y   [loss positions: the second copy of y]
"""

from __future__ import annotations

from dataclasses import dataclass

from sdzero.errors import Refusal

SEPARATOR = "\n\n"

# name -> (phrase after a correct answer, phrase after a wrong one)
CONTROL_PRESETS: dict[str, tuple[str, str]] = {
    "paper": ("Let me rephrase the above solution.",
              "Wait, this response is not correct, let me start over."),
    "qwen": ("Let me rephrase the above solution.",
             "Wait, this response is wrong. Let me correct it."),
    "olmo": ("Let me rephrase the above solution.",
             "Wrong. I need to redo all."),
}


@dataclass(frozen=True)
class ControlPhrases:
    """P_r: the phrase the reviser reads after an answer with reward r."""

    correct: str = CONTROL_PRESETS["paper"][0]
    wrong: str = CONTROL_PRESETS["paper"][1]

    @classmethod
    def preset(cls, name: str) -> "ControlPhrases":
        if name not in CONTROL_PRESETS:
            raise Refusal(f"unknown control-phrase preset {name!r}; choose one of {sorted(CONTROL_PRESETS)}")
        return cls(*CONTROL_PRESETS[name])

    def for_reward(self, reward: float) -> str:
        return self.correct if reward >= 1.0 else self.wrong

    def bridge(self, reward: float) -> str:
        """The text between an answer and its revision: separator, P_r, separator."""
        return SEPARATOR + self.for_reward(reward) + SEPARATOR


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn (the EOS token and the chat template's end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.discard(None)
    return ids


def chat_messages(problem: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """The generator's conversation: an optional system turn, then the problem as the user's turn. A problem
    that is already a conversation (TRL's conversational prompt) is used as it is; `system_prompt` is added
    only when it has no system turn of its own."""
    if isinstance(problem, list):
        messages = [dict(m) for m in problem]
        if system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    messages = [{"role": "user", "content": problem}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def generator_prompt_ids(tokenizer, problem: str | list[dict], system_prompt: str | None = None) -> list[int]:
    ids = tokenizer.apply_chat_template(chat_messages(problem, system_prompt), add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


SYSTEM_PROBE = "sdzero system probe 7d1f"
USER_PROBE = "sdzero user probe 3c9a"


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def template_system_prompt(tokenizer) -> str | None:
    """The system message the chat template puts into a conversation that has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), or None when it adds none.

    Found by rendering one probe conversation with and without a system message: the text around the probe
    system message is the template's wrapping of a system turn, and what that wrapping holds in the render
    without one is the template's own message."""
    user = [{"role": "user", "content": USER_PROBE}]
    try:
        with_system = _render(tokenizer, [{"role": "system", "content": SYSTEM_PROBE}, *user])
    except Exception:  # a template that refuses system messages cannot add one of its own either
        return None
    without = _render(tokenizer, user)
    if with_system.count(SYSTEM_PROBE) != 1:
        return None
    head, tail = with_system.split(SYSTEM_PROBE)
    if len(without) < len(head) + len(tail) or not (without.startswith(head) and without.endswith(tail)):
        return None
    return without[len(head):len(without) - len(tail)] or None


def effective_system_prompt(tokenizer, system_prompt: str | None) -> str | None:
    """The system message every generator, reviser and teacher prompt actually carries: `system_prompt`
    when one is set, else the chat template's own (None when it adds none)."""
    return system_prompt or template_system_prompt(tokenizer)


def check_prompt_room(tokenizer, sets: dict[str, list[dict]], system_prompt: str | None,
                      positions: int | None) -> None:
    """Refuse, in one line naming the problem, a prompt that fills the model's positions: its answer would
    have no room. Collection, Phase 2 and evaluation check their problem sets ({name: problems}) with it
    before any model loads. `positions`: the model's position limit (`modeling.max_positions`; None: none)."""
    if positions is None:
        return
    for name, problems in sets.items():
        for problem in problems:
            length = len(generator_prompt_ids(tokenizer, problem["problem"], system_prompt))
            if length >= positions:
                raise Refusal(f"{name} problem {problem['id']!r}: its prompt is {length:,} tokens, the model has "
                                 f"{positions:,} positions (no room for an answer); remove it from the data or "
                                 f"shorten it (a run directory that recorded it then needs --restart or another --out)")


def strip_end_of_turn(response_ids: list[int], eot_ids: set[int]) -> list[int]:
    """The response without its end-of-turn token and anything after it."""
    for i, token in enumerate(response_ids):
        if token in eot_ids:
            return list(response_ids[:i])
    return list(response_ids)


def token_pieces(tokenizer, ids: list[int]) -> tuple[str, list[str], list[tuple[int, int]]]:
    """The decoded text (special tokens skipped), each token's piece of it, and its character range.

    Pieces come from decoding growing prefixes, not single tokens, so that tokens which only make
    sense together (a character split over several byte tokens) still tile the text exactly.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    offsets, start = [], 0
    for t in range(len(ids)):
        prefix = tokenizer.decode(ids[:t + 1], skip_special_tokens=True)
        end = min(len(text), max(start, len(prefix)))
        offsets.append((start, end))
        start = end
    return text, [text[a:b] for a, b in offsets], offsets


def bridge_ids(tokenizer, phrases: ControlPhrases, reward: float) -> list[int]:
    return tokenizer.encode(phrases.bridge(reward), add_special_tokens=False)


def reviser_context_ids(prompt_ids: list[int], response_ids: list[int], bridge: list[int],
                        eot_ids: set[int]) -> list[int]:
    """What the reviser reads before writing its revision: the same assistant turn, continued."""
    return list(prompt_ids) + strip_end_of_turn(response_ids, eot_ids) + list(bridge)


@dataclass
class DistillLayout:
    """Token layout of one Phase 2 sample.

    `student_ids` = prompt + y; `teacher_ids` = prompt + y - eot + bridge + y (or prompt + y + bridge + y,
    see `distill_layout`). The student's logits at
    `student_positions[t]` and the teacher's at `teacher_positions[t]` both predict y[t].
    """

    student_ids: list[int]
    teacher_ids: list[int]
    student_positions: list[int]
    teacher_positions: list[int]
    truncated: bool

    @property
    def n_targets(self) -> int:
        return len(self.student_positions)


OVERFLOW = ("truncate", "mask")


def distill_layout(prompt_ids: list[int], response_ids: list[int], bridge: list[int], eot_ids: set[int],
                   max_length: int | None = None, overflow: str = "truncate",
                   first_copy_keeps_end: bool = False) -> DistillLayout | None:
    """Layout of one Phase 2 sample, or None when the sample is masked out.

    The first copy of y ends without its end-of-turn token, as in the reviser's context of Phase 1 and
    SRT; with `first_copy_keeps_end` it keeps it (a response cut by the token cap has none to keep).

    The first copy of y is never cut: the teacher must read the whole answer, as the reviser did in
    Phase 1 (collection and SRT always show it the whole y_init). When prompt + y + bridge + y exceeds
    `max_length`, `overflow` = "truncate" keeps the longest prefix of the second copy that fits (the
    student's input is cut to the same prefix, so the targets stay aligned), and "mask" drops the
    sample. A sample whose first copy alone leaves no room for one target is masked either way.
    """
    if overflow not in OVERFLOW:
        raise Refusal(f"unknown overflow rule {overflow!r}; choose one of {', '.join(OVERFLOW)}")
    first_copy = strip_end_of_turn(response_ids, eot_ids)
    if first_copy_keeps_end:
        first_copy = list(response_ids[:len(first_copy) + 1])  # up to its end-of-turn token, if it has one
    context = list(prompt_ids) + first_copy + list(bridge)
    response = list(response_ids)
    truncated = False
    if max_length is not None and len(context) + len(response) > max_length:
        room = max_length - len(context)
        if room < 1 or overflow == "mask":
            return None
        response, truncated = response[:room], True
    # logits at position i predict token i + 1
    student_start = len(prompt_ids) - 1
    teacher_start = len(context) - 1
    n = len(response)
    return DistillLayout(
        student_ids=list(prompt_ids) + response,
        teacher_ids=context + response,
        student_positions=list(range(student_start, student_start + n)),
        teacher_positions=list(range(teacher_start, teacher_start + n)),
        truncated=truncated,
    )
