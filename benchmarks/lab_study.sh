#!/bin/bash
# One (lab model, seed) of the lab study; benchmarks/lab_study.py prints the tables.
#   benchmarks/lab_study.sh MODEL SEED RUNS     e.g. benchmarks/lab_study.sh lab-v2 1 runs/lab13
# Writes RUNS/MODEL_sSEED (demo, inspect SRT/SRT, inspect SD-Zero/SRT), RUNS/MODEL_nop1_sSEED (Phase 2
# from the base model without Phase 1, then its evaluation), and a log beside each. Every step resumes.
set -u
M=$1; S=$2; RUNS=$3
SZ="${SDZERO:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/sdzero}"
R=$RUNS/${M}_s$S; R1=$RUNS/${M}_nop1_s$S
SET="--set distill.teacher_max_length=1024"  # the v2 and control models read up to 1024 positions
mkdir -p "$RUNS"
{ date; /usr/bin/time -f "%e s wall" $SZ demo --model $M --seed $S --out $R $SET --quiet --resume; date; } > $R.demo.log 2>&1
$SZ inspect --run $R --out $R/inspect_srt --quiet > $R.inspect_srt.log 2>&1
{ $SZ distill --model $M --seed $S --out $R1 $SET --quiet --resume &&
  $SZ eval --model $R1/sdzero --seed $S --out $R1/eval_sdzero --quiet; } > $R1.log 2>&1
$SZ inspect --run $R --student sdzero --out $R/inspect_sdzero --quiet > $R.inspect_sdzero.log 2>&1
