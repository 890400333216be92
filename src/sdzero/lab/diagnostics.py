"""What the lab knows about an answer beyond its reward: the correct digit at every step digit it writes.
Phase 2 takes `gold_digit_tokens` as its `diagnostics` and reports how often the teacher's most likely token
there is the correct digit (sdzero/teacher_gold_agreement): whether the teacher's targets are right."""

from __future__ import annotations

from itertools import accumulate

from tokenizers import decoders

from sdzero.generation import Sample
from sdzero.lab.task import Problem, gold_digits
from sdzero.prompts import token_pieces


def gold_digit_tokens(tokenizer, sample: Sample, problem: dict) -> list[tuple[int, int]]:
    """(index in y, token id of the correct digit) at every step digit of y that is a token of its own."""
    token_at = {start: t for t, (start, end) in enumerate(token_spans(tokenizer, sample.ids)) if end == start + 1}
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    return [(token_at[char], digit_ids[digit]) for char, digit in gold_digits(sample.text, Problem.from_row(problem))
            if char in token_at]


def token_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's character range in the decoded text, exactly as `prompts.token_pieces` gives it, with one
    decode per token instead of one per growing prefix where that gives the same ranges: a byte-level decoder
    without clean-up maps bytes to text left to right, so when the tokens decoded one by one tile the whole
    text, no token ends inside a character and every prefix decodes to its tokens' pieces. Otherwise (another
    decoder, or a character split over tokens) the growing prefixes are decoded."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
            and not getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
        if "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True):
            ends = list(accumulate(map(len, pieces)))
            return list(zip([0] + ends[:-1], ends))
    return token_pieces(tokenizer, ids)[2]
