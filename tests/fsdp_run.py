"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2`: SRT, then Phase 2 with teacher sync, on the
tiny model sharded with torch's FSDP2 (`fully_shard`) over gloo on the CPU.

On a CPU machine accelerate never takes its own FSDP path (its state enables FSDP only for GPU-like devices
and falls back to MULTI_CPU), so this script shards the model itself before handing it to sdzero, as a user
with their own FSDP2 set-up would. Nothing in sdzero is patched.

Phase 2 runs twice from the same SRT weights: four steps straight, and two steps (checkpoint at each step)
followed by a resume to four, with the model reset to the SRT weights in between so that only the checkpoint
can bring the trained weights back. Last, keep-best brings back the weights of its best evaluation. Each
process saves what it holds so the test can compare them."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

from sdzero.config import RunConfig
from sdzero.distill import DistillConfig, distill
from sdzero.evaluate import evaluate
from sdzero.generation import SamplingConfig, make_generator
from sdzero.modeling import load_model
from sdzero.pipeline import save_stage
from sdzero.prompts import ControlPhrases
from sdzero.srt import SRTConfig, train_srt
from sdzero.training import seed_everything
from tiny import even_length

model_path, out = sys.argv[1], Path(sys.argv[2])
state = PartialState(cpu=True)  # the gloo process group that fully_shard shards over
model, tokenizer = load_model(model_path, device="cpu")
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights() -> dict:
    """The whole model, gathered from both shards (every process takes part; rank 0 receives it)."""
    return get_model_state_dict(model, options=FULL)


phrases = ControlPhrases()
problems = [{"id": str(i), "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
rows = [{"problem": p["problem"], "init_reward": float(i % 2), "init_ids": tokenizer.encode(f"It is {i}"),
         "revised_ids": tokenizer.encode(p["answer"]) + [tokenizer.eos_token_id]} for i, p in enumerate(problems)]
seed_everything(0)
train_srt(model, tokenizer, rows[:6], phrases, SRTConfig(lr=1e-2, epochs=1, batch_size=4, save_every=1),
          out_dir=out / "srt", progress=False)
after_srt = full_weights()
save_stage(model, tokenizer, out / "srt", RunConfig(model=model_path), "srt")

sampling = SamplingConfig(max_new_tokens=8)
generator = make_generator(model, tokenizer, sampling)


def accuracy(student) -> float:
    # A real evaluation: every process decodes (in lockstep) and the main process's figure counts.
    return evaluate(generator, problems[:4], even_length, k=2, progress=False)["accuracy"]


def phase2(folder: Path, max_steps: int, resume: bool = False) -> dict:
    seed_everything(1)
    # keep_best off: the result is the last step's student, so the resumed run has something to match
    cfg = DistillConfig(prompts_per_step=4, micro_batch_size=1, max_steps=max_steps, lr=1e-2, warmup_steps=1,
                        sync_every=2, save_every=1, eval_every=2, keep_best=False)
    return distill(model, tokenizer, problems, even_length, phrases, sampling, cfg, out_dir=folder, progress=False,
                   resume=resume, evaluate_fn=accuracy, generator=generator)


phase2(out / "straight", 4)
straight = full_weights()
save_stage(model, tokenizer, out / "straight", RunConfig(model=model_path), "sdzero")
reset = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
set_model_state_dict(model, dict(after_srt), options=reset)  # a copy: the call replaces the dict's values
phase2(out / "resumed", 2)
set_model_state_dict(model, dict(after_srt), options=reset)
phase2(out / "resumed", 4, resume=True)
resumed = full_weights()
# Keep-best: with no evaluation better than the first (step 0), two more steps end on the weights they
# started from, gathered when they were tracked and broadcast back into the shards at the end.
distill(model, tokenizer, problems, even_length, phrases, sampling,
        DistillConfig(prompts_per_step=4, micro_batch_size=1, max_steps=2, lr=1e-2, warmup_steps=1, eval_every=1),
        out_dir=out / "keep_best", progress=False, evaluate_fn=lambda student: 0.0, generator=generator)
kept = full_weights()
# Every process's own full copy (all-gathered, not only on rank 0): the processes must agree.
everywhere = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
torch.save({"srt": after_srt, "straight": straight, "resumed": resumed, "kept": kept, "own": everywhere},
           out / f"rank{state.process_index}.pt")
