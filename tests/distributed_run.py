"""Run by tests/test_real_models.py under `accelerate launch --cpu --num_processes N`: SRT and two
Phase 2 steps on the tiny model; every process saves its final weights so the test can check that
the processes stayed in step."""

import sys
from pathlib import Path

import torch

from sdzero.distill import DistillConfig, distill
from sdzero.generation import SamplingConfig
from sdzero.modeling import load_model
from sdzero.prompts import ControlPhrases
from sdzero.srt import SRTConfig, train_srt
from tiny import even_length

model_path, out = sys.argv[1], Path(sys.argv[2])
model, tokenizer = load_model(model_path, device="cpu")
phrases = ControlPhrases()
problems = [{"id": str(i), "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
rows = [{"problem": p["problem"], "init_reward": float(i % 2), "init_ids": tokenizer.encode(f"It is {i}"),
         "revised_ids": tokenizer.encode(p["answer"]) + [tokenizer.eos_token_id]} for i, p in enumerate(problems)]
train_srt(model, tokenizer, rows[:6], phrases, SRTConfig(lr=1e-2, epochs=1, batch_size=4), out_dir=out / "srt",
          progress=False)
after_srt = torch.cat([p.detach().flatten() for p in model.parameters()])
distill(model, tokenizer, problems, even_length, phrases, SamplingConfig(max_new_tokens=10),
        DistillConfig(prompts_per_step=5, micro_batch_size=1, max_steps=2, lr=1e-2, warmup_steps=1),
        out_dir=out / "sdzero", progress=False)
after_distill = torch.cat([p.detach().flatten() for p in model.parameters()])
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save({"srt": after_srt, "distill": after_distill}, out / f"rank{rank}.pt")
