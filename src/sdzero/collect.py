"""Phase 1 data: y_init -> reward -> P_r -> y_revised, keeping only verified-correct revisions.

For each problem of N1 the generator samples `answers_per_problem` first answers; each is scored,
the reviser reads it followed by the control phrase its reward selects, and samples
`revisions_per_answer` revisions in the same assistant turn. Revisions that the verifier accepts
are kept (de-duplicated) in revisions.jsonl, when both the first answer and the revision finished
(ended with the end-of-turn token: SRT's generation loss trains on both) and the revision is not a
degenerate loop (a repeated tail, or a chain of control phrases). Progress is written per chunk of problems to
attempts.jsonl, and a restarted collection skips the problems already recorded there. A first answer that
no reward function could judge (reward None) is not revised, and is counted (first_answers_without_reward).

Each attempts line also keeps every answer sampled for its problem, kept or not (`answer_record`): the text,
token count, whether it finished, and reward of each first answer, with its revisions nested under it. A
collection that keeps nothing can thus be read answer by answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from sdzero.checks import check_ranges
from sdzero.generation import Generator, Sample
from sdzero.modeling import tokenizer_fingerprint
from sdzero.prompts import (ControlPhrases, bridge_ids, end_of_turn_ids, generator_prompt_ids,
                            reviser_context_ids)
from sdzero.rewards import Verifier
from sdzero.training import process_state, reached, read_jsonl, seed_everything

# Openers that flatter the feedback instead of solving the problem; the official release drops them.
SYCOPHANTIC_OPENERS = re.compile(r"^\W*(you'?re (absolutely )?right|you are (absolutely )?right|i apologi[sz]e"
                                 r"|my apologies|sorry)", re.IGNORECASE)


@dataclass
class CollectConfig:
    """Phase 1 collection."""

    answers_per_problem: int = 1
    """First answers y_init sampled per problem (paper: 1)."""
    revisions_per_answer: int = 3
    """Revisions sampled per first answer (paper: 3)."""
    revise_correct: bool = True
    """Also revise correct answers with the "rephrase" phrase (paper); the official code revises only wrong ones."""
    drop_sycophantic: bool = True
    """Drop revisions that open by flattering the feedback ("You're absolutely right", ...)."""
    max_control_phrases: int = 0
    """Drop tuples whose first answer and revision together write more control phrases than this.
    SRT's generation target is y_init + P_r + y_revised: with 0 it is one answer, one phrase and one
    revision; every phrase more teaches the generator a longer chain of attempts ("... Let me rephrase
    the above solution. ... Let me rephrase ..."), which on the lab runs into the token cap."""
    chunk_size: int = 256
    """Problems per incremental write. Each chunk is sampled together from a seed of its own, so a run keeps
    its chunk size."""

    def validate(self) -> None:
        check_ranges("collect", self, {"answers_per_problem": ">= 1", "revisions_per_answer": ">= 1",
                                       "max_control_phrases": ">= 0", "chunk_size": ">= 1"})


def is_degenerate(text: str, min_repeats: int = 8) -> bool:
    """True when the text ends in the same short piece repeated many times (a looping sample)."""
    tail = text[-400:]
    for width in range(1, 25):
        piece = tail[-width:]
        if piece and tail.endswith(piece * min_repeats):
            return True
    return False


def keep_revision(first: Sample, revision: Sample, reward: float, phrases: ControlPhrases,
                  cfg: CollectConfig) -> bool:
    """A verified, finished revision of a finished first answer, with no chain of attempts, loop or flattery."""
    if reward is None or reward < 1.0 or not (first.finished and revision.finished) or is_degenerate(revision.text):
        return False
    phrases_written = control_phrase_count(first.text, phrases) + control_phrase_count(revision.text, phrases)
    if phrases_written > cfg.max_control_phrases:
        return False
    return not (cfg.drop_sycophantic and SYCOPHANTIC_OPENERS.match(revision.text))


def control_phrase_count(text: str, phrases: ControlPhrases) -> int:
    return text.count(phrases.correct) + text.count(phrases.wrong)


def collect(generator: Generator, problems: list[dict], verifier: Verifier, phrases: ControlPhrases,
            out_dir: str | Path, cfg: CollectConfig | None = None, *, system_prompt: str | None = None,
            progress: bool = True, seed: int | None = None) -> dict:
    """Run Phase 1 collection into `out_dir` (revisions.jsonl, attempts.jsonl); returns the counts.

    With `seed`, each chunk samples from its own seed (the run seed and the chunk's place in `problems`),
    so a collection killed and restarted collects what an uninterrupted one would."""
    cfg = cfg or CollectConfig()
    verifier = Verifier.of(verifier)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attempts_path, revisions_path = out_dir / "attempts.jsonl", out_dir / "revisions.jsonl"
    # Under `accelerate launch` each process samples its share of every chunk and the main process writes
    # them all: every problem is collected once.
    state = process_state()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    if main:
        done, seen = resume_state(attempts_path, revisions_path)
    state.wait_for_everyone()
    if not main:
        done, seen = resume_state(attempts_path, revisions_path)
    todo = [p for p in problems if p["id"] not in done]
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc="collect", disable=not progress or not main)
    for start in range(0, len(todo), cfg.chunk_size * world):
        block = todo[start:start + cfg.chunk_size * world]
        chunk = block[rank::world]
        if seed is not None:
            seed_everything(seed * 1_000_003 + len(problems) - len(todo) + start + rank)
        results = gather_object(collect_chunk(generator, chunk, verifier, phrases, cfg, system_prompt, seen))
        if main:
            # Per problem: its revisions, then its attempts line, which marks it done.
            with revisions_path.open("a") as revisions_out, attempts_path.open("a") as attempts_out:
                for problem_id, rewards, rows, n, tokens, answers in results:
                    revisions_out.writelines(json.dumps(row) + "\n" for row in rows)
                    revisions_out.flush()
                    attempts_out.write(json.dumps({"id": problem_id, "rewards": rewards, "kept": len(rows),
                                                   "generations": n, "sampled_tokens": tokens,
                                                   "answers": answers}) + "\n")
                    attempts_out.flush()
        state.wait_for_everyone()
        reached(f"collect-chunk-{start // (cfg.chunk_size * world) + 1}")
        bar.update(len(block))
    bar.close()
    return collection_summary(out_dir, cfg)


def collect_chunk(generator: Generator, chunk: list[dict], verifier: Verifier, phrases: ControlPhrases,
                  cfg: CollectConfig, system_prompt: str | None, seen: set) -> list[tuple]:
    """First answers and verified revisions of a chunk of problems: per problem, (id, first-answer rewards,
    kept tuples, generations, tokens sampled, every answer sampled as `answer_record`s). Each tuple records
    its tokenizer, without which its ids mean nothing."""
    if not chunk:
        return []
    tokenizer = generator.tokenizer
    eot, fingerprint = end_of_turn_ids(tokenizer), tokenizer_fingerprint(tokenizer)
    prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in chunk]
    first_answers = generator.sample(prompts, cfg.answers_per_problem, progress=False)

    # Everything to revise in this chunk, revised in one batched call.
    first_rewards = verifier.score_groups(first_answers, chunk, generator.sampling)
    # Every first answer of the chunk as attempts.jsonl keeps it; its revisions are added as they are judged.
    answer_records = [[{**answer_record(answer, reward), "revisions": []} for answer, reward in zip(answers, rewards)]
                      for answers, rewards in zip(first_answers, first_rewards)]
    to_revise, revised_records = [], []  # (problem index, first answer, reward), and that answer's record
    for i, (answers, rewards) in enumerate(zip(first_answers, first_rewards)):
        for answer, reward, record in zip(answers, rewards, answer_records[i]):
            if reward is None or (reward >= 1.0 and not cfg.revise_correct):
                continue  # no reward: no control phrase to pick
            to_revise.append((i, answer, reward))
            revised_records.append(record)
    contexts = [reviser_context_ids(prompts[i], answer.ids, bridge_ids(tokenizer, phrases, reward), eot)
                for i, answer, reward in to_revise]
    revisions = generator.sample(contexts, cfg.revisions_per_answer, progress=False) if contexts else []

    kept_rows: list[list[dict]] = [[] for _ in chunk]
    # Budget: every sampled response of a problem (first answers and revisions) and its tokens.
    sampled_tokens = [sum(len(a.ids) for a in answers) for answers in first_answers]
    generations = [len(answers) for answers in first_answers]
    for (i, _, _), revised in zip(to_revise, revisions):
        sampled_tokens[i] += sum(len(s.ids) for s in revised)
        generations[i] += len(revised)
    revision_rewards = verifier.score_groups(revisions, [chunk[i] for i, _, _ in to_revise], generator.sampling)
    for (i, answer, reward), record, revised, verdicts in zip(to_revise, revised_records, revisions,
                                                              revision_rewards):
        problem = chunk[i]
        for sample, verified in zip(revised, verdicts):
            key = (problem["id"], tuple(sample.ids))
            kept = key not in seen and keep_revision(answer, sample, verified, phrases, cfg)
            record["revisions"].append({**answer_record(sample, verified), "kept": kept})
            if not kept:
                continue
            seen.add(key)
            kept_rows[i].append({
                "id": problem["id"], "problem": problem["problem"], "answer": problem.get("answer"),
                "init_reward": reward, "control_phrase": phrases.for_reward(reward),
                "init_text": answer.text, "init_ids": answer.ids,
                "revised_text": sample.text, "revised_ids": sample.ids, "tokenizer": fingerprint,
            })
    return [(p["id"], *per_problem) for p, *per_problem in zip(chunk, first_rewards, kept_rows, generations,
                                                                sampled_tokens, answer_records)]


def answer_record(sample: Sample, reward: float | None) -> dict:
    """One sampled answer as attempts.jsonl keeps it: its text, token count, whether it finished (ended with
    the end-of-turn token) and its reward. In the file a first answer also lists its revisions (empty when it
    was not revised), and a revision says whether it was kept."""
    return {"text": sample.text, "tokens": len(sample.ids), "finished": sample.finished, "reward": reward}


def resume_state(attempts_path: Path, revisions_path: Path) -> tuple[set, set]:
    """Problems already done and revisions already kept, after tidying what a killed run left behind:
    a line cut short, and revisions of a problem whose attempts line was never written."""
    attempts = read_jsonl(attempts_path, repair=True) if attempts_path.exists() else []
    revisions = read_jsonl(revisions_path, repair=True) if revisions_path.exists() else []
    done = {row["id"] for row in attempts}
    orphans = [r for r in revisions if r["id"] not in done]
    if orphans:
        revisions = [r for r in revisions if r["id"] in done]
        revisions_path.write_text("".join(json.dumps(r) + "\n" for r in revisions))
    return done, {(r["id"], tuple(r["revised_ids"])) for r in revisions}


def collection_summary(out_dir: Path, cfg: CollectConfig) -> dict:
    attempts = read_jsonl(out_dir / "attempts.jsonl") if (out_dir / "attempts.jsonl").exists() else []
    revisions = read_jsonl(out_dir / "revisions.jsonl") if (out_dir / "revisions.jsonl").exists() else []
    rewards = [r for row in attempts for r in row["rewards"]]
    scored = [r for r in rewards if r is not None]  # None: no reward function gave a value
    n_revised = sum(1 for r in scored if r < 1.0 or cfg.revise_correct)
    return {
        "problems": len(attempts),
        "first_answers": len(rewards),
        "first_answer_accuracy": sum(scored) / max(1, len(scored)),
        "first_answers_without_reward": len(rewards) - len(scored),
        "revisions_sampled": n_revised * cfg.revisions_per_answer,
        "generations": len(rewards) + n_revised * cfg.revisions_per_answer,
        "sampled_tokens": sum(row.get("sampled_tokens", 0) for row in attempts),
        "kept": len(revisions),
        "kept_after_wrong": sum(1 for r in revisions if r["init_reward"] < 1.0),
        "kept_after_right": sum(1 for r in revisions if r["init_reward"] >= 1.0),
    }
