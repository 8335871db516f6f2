#!/usr/bin/env bash
# GPU checks CI cannot run (it has no GPU): bf16 and QLoRA on CUDA through whole recipes, on the built-in tiny model.
# Run by hand on a CUDA machine with the package installed:  bash bench/gpu_check.sh OUT_DIR
# Prints, per run, the first and last logged values; under bf16 PPO's first update must show approx_kl 0 and
# clipfrac 0 (rollout, reference and epochs in one precision); so must every GRPO update run as one epoch of one
# minibatch (its sampling log-probs recomputed by the training forward under bf16 and QLoRA: ratio exactly 1).
# NEW_ONLY=1 runs only the stages added after the first check (grpo, kto); ONLY_FSDP2=1 only the FSDP2 runs at the end.
set -euo pipefail
out=${1:-runs/gpu-check}
mkdir -p "$out"
run() {  # name recipe overrides...   (LAUNCH: the command that starts alignlab, default one plain process)
  local name=$1 recipe=$2; shift 2
  local t0=$SECONDS
  ${LAUNCH:-python} -m alignlab run "$recipe" "output_dir=$out/$name" "$@" > "$out/$name.log" 2>&1 || { tail -30 "$out/$name.log"; echo "== $name FAILED"; return 0; }
  echo "== $name ($((SECONDS - t0)) s)"
  python - "$out/$name" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*/metrics.jsonl")):
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    steps = [r for r in rows if not r.get("final")]
    keys = [k for k in ("loss", "policy_loss", "ratio", "approx_kl", "clipfrac", "clip_low_frac", "clip_high_frac", "kl",
                       "score", "reward", "rewards/accuracies") if any(k in r for r in steps)]
    def at(k, rows):
        return next((r[k] for r in rows if k in r), None)

    print(f"  {f.parent.name}: " + ", ".join(f"{k} {at(k, steps)} -> {at(k, steps[::-1])}" for k in keys))
    final = rows[-1] if rows and rows[-1].get("final") else {}
    shown = {k: v for k, v in final.items() if k in ("eval_loss", "eval_accuracy", "eval_rewards/accuracies", "train_loss")}
    if shown:
        print(f"    final: {shown}")
PY
}
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
if [ -z "${ONLY_FSDP2:-}" ]; then
if [ -z "${NEW_ONLY:-}" ]; then
[ -n "${ONLY_PPO:-}" ] || run quickstart-bf16 recipes/quickstart.yaml stages.sft.train.bf16=true stages.dpo.train.bf16=true
[ -n "${ONLY_PPO:-}" ] || run qlora-cuda recipes/sft_dpo_qlora.yaml
ACCELERATE_MIXED_PRECISION=bf16 run ppo-bf16 recipes/sft_ppo_reward_fn.yaml stages.ppo.train.max_steps=4 stages.ppo.train.logging_steps=1 stages.ppo.train.save_steps=null
fi
fi
# GRPO: one epoch of one minibatch per update (64 = 8 prompts x 8 samples), so every update's ratio must be exactly 1.
grpo=(stages.sft.dataset.size=1000 stages.grpo.train.max_steps=8 stages.grpo.train.epochs=1
      stages.grpo.train.minibatch_size=64 stages.grpo.train.logging_steps=1 stages.grpo.train.save_steps=null
      stages.grpo.watch_steps=null)
if [ -z "${ONLY_FSDP2:-}" ]; then
ACCELERATE_MIXED_PRECISION=bf16 run grpo-bf16 recipes/sft_grpo_arith.yaml "${grpo[@]}"
run grpo-qlora-cuda recipes/sft_grpo_arith.yaml peft.method=qlora "${grpo[@]}"
run kto-bf16 recipes/sft_kto_lora.yaml stages.sft.train.bf16=true stages.kto.train.bf16=true stages.sft.dataset.size=1000
fi
# FSDP2 on one GPU (recipes/accelerate/fsdp2.yaml, bf16): the trainer stages sharded by accelerate, alignlab's own loops
# (grpo) by themselves (alignlab/parallel.py); LoRA and full fine-tuning. Each must finish, save an ordinary model
# folder, and log the same kind of curves as without FSDP; stage_output.json's parallel shows shard fsdp2.
fsdp2="accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1"
LAUNCH=$fsdp2 run fsdp2-sft-dpo-lora recipes/sft_dpo_lora.yaml stages.sft.train.bf16=true stages.dpo.train.bf16=true
LAUNCH=$fsdp2 run fsdp2-sft-dpo-full recipes/quickstart.yaml stages.sft.train.bf16=true stages.dpo.train.bf16=true
LAUNCH=$fsdp2 run fsdp2-grpo-full recipes/sft_grpo_arith.yaml "${grpo[@]}"
LAUNCH=$fsdp2 run fsdp2-grpo-lora recipes/sft_grpo_arith.yaml peft.method=lora "${grpo[@]}"
for d in "$out"/fsdp2-*/; do
  python -c "import json, sys, pathlib; [print(' ', p.parent.name, json.loads(p.read_text()).get('parallel')) for p in sorted(pathlib.Path(sys.argv[1]).glob('*/stage_output.json'))]" "$d"
done
