"""What alignlab's two RL loops share (PPO: alignlab/rl/ppo.py, GRPO: alignlab/rl/grpo.py): the loop around a
step, the prompt stream, the process arithmetic, the NaN guard, metrics rows and checkpoints. Each algorithm's
file keeps what differs: sampling and scoring its rollout, its advantages and losses, its log line.

The loop (RLTrainer.train): resume from the newest complete checkpoint, drop metric rows written after it, then
run `train_step` until `train.max_steps`, averaging metrics over each `train.logging_steps` window, and checkpoint every
`train.save_steps` (not after the last step: the stage saves the final model itself). A step may end the run early by
returning Stop (GRPO's stop_if) with the entries it adds to the summary.

Randomness that makes resume and several processes exact: the prompt of position k in the run's stream is drawn
from one seeded permutation per pass over the data (`_prompt_index`), each response samples from its own stream
seeded by its index in the run (the algorithms compute `row_seeds`), and each step's minibatch shuffles from
`step_seed` (seed, step, process). Dropout is set to 0 in the policy (a PPO ratio needs the same function twice).

Precision: `low_precision` is the one rule both loops' default (recompute_logprobs null) follows: in half precision
(autocast, a half-precision model, a quantized base computing in bf16/fp16) the sampling pass's cached decoding
drifts from the training forward, so the sampling policy's log-probs are recomputed with a forward.

Several processes: `_share(local)` weighs a mean over this process's rows by its share of the global count, so the
mean over processes of the weighted means is the global mean (what DDP's gradient average needs);
`_mean_over_processes` averages the logged metrics (one all-reduce); `_check_finite` stops every process when any
sees a nan or inf.

Checkpoints: checkpoints/step-N holds trainable.safetensors (the trainable weights: adapter or full, and PPO's
value head), optimizer.pt, trainer_state.json ({"step": N} plus what the algorithm adds, e.g. PPO's KL controller)
and the COMPLETE marker; written to .step-N.tmp, marked complete last, then renamed, so a cut-off write is never
resumed from (alignlab/checkpoints.py). A recipe with `parallel.shard: fsdp2` writes a distributed checkpoint
instead (dcp/: each process its shards of the trainable weights and of the optimizer state, keyed by parameter
name, with torch.distributed.checkpoint), so a checkpoint written by N processes resumes on M.

Sharding (alignlab/parallel.py): with `parallel.shard: fsdp2` and several processes the trainer's model (the policy,
and PPO's value head) is sharded with FSDP2 instead of wrapped in DDP; sampling passes run inside `_sampling()`,
which gathers the weights the way `parallel.gather` says.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignlab.checkpoints import COMPLETE_MARKER, last_checkpoint, prune_checkpoints
from alignlab.console import progress
from alignlab.contract import TrainingDiverged, checkpoint_note, keep_metrics_until
from alignlab.generation import end_token_ids
from alignlab.losses import entropy_from_logits
from alignlab.parallel import Sharding, only_trainable
from alignlab.schema import ParallelSpec

log = logging.getLogger("alignlab")
DCP_DIR = "dcp"  # a sharded recipe's checkpoint: torch.distributed.checkpoint's files
ScoreFn = Callable[[list, list[str]], torch.Tensor]  # (prompts, completion texts) -> [B] float scores
Reference = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (input_ids, attention_mask, C) -> [B, C]


@dataclass
class Stop:
    """What a step returns instead of its metrics to end the run before its update: `summary`, the entries it adds
    to the run's summary (why it stopped, the step it kept)."""

    summary: dict


class RLTrainer:
    """The loop machinery of an RL trainer. A subclass sets `name` (log lines, progress bar, resume note),
    `headline` (the metric a resumed run reports as its first, `first_<headline>`), calls `_prepare` with its model, and defines
    `train_step() -> metrics` and `_log_line(row)`; `_extra_state` / `_load_extra_state` add to the checkpoint's
    trainer_state.json."""

    name: str
    headline: str

    def __init__(self, *, accelerator, policy: nn.Module, tokenizer, prompts: list, reference, spec, seed: int,
                 stage_dir: Path, sharding: Sharding | None = None):  # fmt: skip
        self.acc, self.tokenizer, self.prompts = accelerator, tokenizer, prompts
        self.sharding = sharding or Sharding(ParallelSpec(), accelerator, self.name)
        self.reference, self.spec, self.seed, self.stage_dir = reference, spec, seed, Path(stage_dir)
        self.end_ids = end_token_ids(tokenizer, policy)  # what ends a response: sampling, mask, eos_rate
        self.step = 0
        self._perms: dict[int, torch.Tensor] = {}
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self.ckpt_dir = self.stage_dir / "checkpoints"
        self.logs = [self.metrics_path]  # files of per-step rows, cut back to the resumed step

    def _prepare(self, model: nn.Module, **adamw) -> None:
        """Dropout off, AdamW over the trainable parameters, both through accelerator.prepare (DDP); or, sharded,
        the model sharded with FSDP2 (alignlab/parallel.py) and AdamW over its shards. With train.layer_lr_decay,
        one parameter group per depth of the model, each at its rate (alignlab/optim.py)."""
        disable_dropout(model)
        if self.sharding.enabled:
            self.model = self.sharding.shard(model)
            self.params = [p for p in model.parameters() if p.requires_grad]
            adamw.pop("fused", None)  # the fused kernel takes plain tensors, not shards
            self.optimizer = torch.optim.AdamW(self._param_groups(model, adamw), **adamw)
            return
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self._param_groups(model, adamw), **adamw)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

    def _param_groups(self, model: nn.Module, adamw: dict) -> list:
        decay = self.spec.train.layer_lr_decay
        if decay is None:
            return self.params
        from alignlab.optim import layer_lr_groups

        return layer_lr_groups(model, adamw["lr"], decay, adamw.get("weight_decay", 0.0))

    @property
    def unwrapped(self) -> nn.Module:
        return self.model if self.sharding.enabled else self.acc.unwrap_model(self.model)

    def _sampling(self):
        """The context every sampling pass (and the rollout's other no-grad passes) runs in: the sharded weights
        gathered as `parallel.gather` says; nothing unsharded."""
        return self.sharding.gathered(self.model)

    # ------------------------------------------------------------------------------------------------ loop

    def train(self, resume: bool = False) -> dict:
        ckpt = last_checkpoint(self.ckpt_dir, "step") if resume else None
        if ckpt is not None:
            self.load_checkpoint(ckpt)
            log.info("%s: resumed from %s (step %d)", self.name, ckpt, self.step)
        if self.acc.is_main_process:
            for path in self.logs:
                keep_metrics_until(path, self.step)
        self.acc.wait_for_everyone()
        self._resumed()
        first = first_logged(self.metrics_path, self.headline) if ckpt is not None else None
        window: list[dict] = []
        last: dict = {}
        end: dict = {}
        start = time.perf_counter()
        bar = progress(
            total=self.spec.train.max_steps,
            initial=self.step,
            desc=self.name,
            unit="step",
            main_process=self.acc.is_main_process,
        )
        while self.step < self.spec.train.max_steps:
            t0 = time.perf_counter()
            metrics = self.train_step()
            if isinstance(metrics, Stop):
                end = metrics.summary
                break
            metrics["step_time"] = time.perf_counter() - t0
            self.step += 1
            bar.update(1)
            window.append(metrics)
            if self.step % self.spec.train.logging_steps == 0 or self.step == self.spec.train.max_steps:
                # a key missing from some steps (GRPO's kl, skipped_update) is averaged over the steps that have it
                keys = dict.fromkeys(k for m in window for k in m)
                last = {k: _mean([m[k] for m in window if k in m]) for k in keys}
                self._log(last)
                window = []
                first = last[self.headline] if first is None else first
            save = self.spec.train.save_steps
            if save and self.step % save == 0 and self.step < self.spec.train.max_steps:
                self.save_checkpoint()
        bar.close()
        summary = {f"final_{k}": v for k, v in last.items()}
        if first is not None:
            summary[f"first_{self.headline}"] = first
        summary["train_runtime"] = time.perf_counter() - start
        summary.update(end)
        return summary

    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def _resumed(self) -> None:
        """After resuming (or starting) and cutting the logs back: rebuild what the algorithm keeps from them."""

    # ------------------------------------------------------------------------------------------- the stream

    def _stream(self, per_process: int) -> range:
        """Positions in the run's stream of this process's prompts (or samples) at this step: process p takes the
        p-th slice of the step's global batch of `per_process` x processes."""
        first = (self.step * self.acc.num_processes + self.acc.process_index) * per_process
        return range(first, first + per_process)

    def _prompt_index(self, k: int) -> int:
        """Prompt of position k in the run's stream: one seeded permutation per pass over the data, so the choice
        depends only on (seed, k), not on what ran before or on the number of processes."""
        data_pass, pos = divmod(k, len(self.prompts))
        if data_pass not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            self._perms = {data_pass: torch.randperm(len(self.prompts), generator=generator)}
        return int(self._perms[data_pass][pos])

    def _seed(self) -> int:
        """This step's and process's seed for the minibatch shuffles."""
        return step_seed(self.seed, self.step, self.acc.process_index)

    # -------------------------------------------------------------------------------------------- processes

    def _all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(x, reduction="sum") if self.acc.num_processes > 1 else x

    def _share(self, local: torch.Tensor) -> torch.Tensor:
        """processes x this process's count / every process's: 1 in one process. A mean over this process's rows
        times this, averaged over processes, is the mean over every process's rows."""
        local = torch.as_tensor(local, dtype=torch.float32, device=self.acc.device)
        return local * self.acc.num_processes / self._all_sum(local).clamp_min(1e-8)

    def _mean_over_processes(self, stats: dict) -> dict[str, float]:
        """Per-process means of equal-sized batches -> means over every process (one all-reduce)."""
        keys = sorted(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32, device=self.acc.device) for k in keys])
        if self.acc.num_processes > 1:
            values = self.acc.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _check_finite(self, ok: torch.Tensor, what: str) -> None:
        """Stop every process (one all-reduce) when any sees a non-finite value, before it reaches the weights."""
        bad = self._all_sum((~ok).float().reshape(1).to(self.acc.device))
        if bad.item() > 0:
            raise TrainingDiverged(
                f"stopped at {self.name.upper()} step {self.step + 1} of {self.spec.train.max_steps}: "
                f"{what if not ok else 'a non-finite value on another process'}. "
                f"Likely causes: train.learning_rate too high (now {self.spec.train.learning_rate}); "
                + ("fp16 overflow (use bfloat16 or float32); " if self._fp16 else "")
                + "a reward that returns nan/inf or huge values. "
                + checkpoint_note(last_checkpoint(self.ckpt_dir, "step"))
            )

    def _update(self, loss: torch.Tensor, max_grad_norm: float) -> None:
        """One optimizer step on a minibatch's `loss` (already weighed by this process's share): the NaN guard first,
        so a non-finite loss never reaches the weights, then backward, clipping (max_grad_norm > 0) and AdamW."""
        self._check_finite(torch.isfinite(loss), f"the {self.name.upper()} loss is nan or inf")
        if self.sharding.enabled:  # FSDP2 reduce-scatters the gradients; clipping takes the norm over every shard
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        else:
            self.acc.backward(loss)
            if max_grad_norm > 0:
                self.acc.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def _fp16(self) -> bool:
        return self.acc.mixed_precision == "fp16" or next(self.unwrapped.parameters()).dtype == torch.float16

    # ---------------------------------------------------------------------------------------------- metrics

    def _log(self, metrics: dict) -> None:
        row = {k: float(v) for k, v in metrics.items()}  # already averaged over processes
        if self.acc.is_main_process:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": self.step, **row}) + "\n")
            self._log_line(row)
        if self.acc.trackers:
            self.acc.log(row, step=self.step)

    def _log_line(self, row: dict[str, float]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict:
        """What trainer_state.json holds beside the step."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        final = self.ckpt_dir / f"step-{self.step}"
        tmp = self.ckpt_dir / f".step-{self.step}.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.sharding.requested:  # every process writes its shards
            self.acc.wait_for_everyone()
            self._save_distributed(tmp / DCP_DIR)
            self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if not self.sharding.requested:
                save_file(trainable_state(self.unwrapped), str(tmp / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            state = {"step": self.step, **self._extra_state()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            (tmp / COMPLETE_MARKER).write_text("")  # last: a folder without it is never resumed from
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            prune_checkpoints(self.ckpt_dir, self.spec.train.save_total_limit, "step")
        self.acc.wait_for_everyone()

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if (path / DCP_DIR).is_dir():
            self._load_distributed(path / DCP_DIR)
        elif self.sharding.enabled:
            raise ValueError(
                f"checkpoint {path} was written by a run without parallel.shard fsdp2 (whole weights in "
                "trainable.safetensors); resume it with parallel.shard none, or start this stage over without --resume"
            )
        else:
            self._load_whole(path)
        state = json.loads((path / "trainer_state.json").read_text())
        self._load_extra_state(state)
        self.step = int(state["step"])

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # the trainable tensors only (dcp.load fails on any of them missing from the checkpoint), so strict=False
        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def _save_distributed(self, folder: Path) -> None:
        """The trainable weights and AdamW's state, keyed by parameter name: each process writes its shards. Before
        the first update AdamW has no state yet, and the checkpoint holds none (reading it would make one up: a step
        with zero moments, which would shift every later step's bias correction)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        options = self._state_options()
        state = {"model": only_trainable(self.unwrapped, get_model_state_dict(self.unwrapped, options=options))}
        if self.optimizer.state:
            state["optim"] = get_optimizer_state_dict(self.unwrapped, self.optimizer, options=options)
        dcp.save(state, checkpoint_id=str(folder))

    def _load_distributed(self, folder: Path) -> None:
        """A distributed checkpoint, written by any number of processes, into this run's (sharded or whole)
        weights and optimizer."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = self._state_options()
        saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        state = {"model": only_trainable(self.unwrapped, get_model_state_dict(self.unwrapped, options=options))}
        if any(k.startswith("optim.") for k in saved):
            state["optim"] = get_optimizer_state_dict(self.unwrapped, self.optimizer, options=options)
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(self.unwrapped, state["model"], options=options)
        if "optim" in state:
            set_optimizer_state_dict(self.unwrapped, self.optimizer, state["optim"], options=options)

    def _load_whole(self, path: Path) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(path / "trainable.safetensors"), device=str(self.acc.device))
        own = dict(self.unwrapped.named_parameters())
        missing = set(trainable_state(self.unwrapped)) - set(saved)
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                own[name].copy_(tensor)
        self.optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=self.acc.device, weights_only=True)
        )


class SamplingRecorder:
    """Observer of generate()'s raw logits (alignlab.generation.generate(observe=...)): per decoding step, the
    log-prob of the sampled token and the entropy under logits / temperature, as the training forward computes
    them, without storing [B, C, V] logits. A step's token shows up as the last input id of the next step; `finish`
    reads the last one off the response."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None  # [B, V] log-softmax of the previous step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        if self._last is not None:
            self.logprobs.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logits = scores.float() / self.temperature
        self.entropy.append(entropy_from_logits(logits))
        self._last = torch.log_softmax(logits, dim=-1)

    def finish(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """response [B, C] -> (log-probs [B, C], entropy [B, C])."""
        self.logprobs.append(self._last.gather(-1, response[:, -1:].to(self._last.device)).squeeze(-1))
        self._last = None
        return torch.stack(self.logprobs, dim=1), torch.stack(self.entropy, dim=1)


def low_precision(accelerator, model: nn.Module) -> bool:
    """Whether `model` (the policy LM) runs in half precision, where cached decoding drifts from a full forward, so
    the RL loops' default (recompute_logprobs null) recomputes the sampling policy's log-probs with the training
    forward: accelerate's bf16/fp16 mixed precision (autocast), a float16/bfloat16 model, or a bitsandbytes-quantized
    base whose layers compute in half precision (QLoRA: bnb_4bit_compute_dtype, bfloat16 by default; 8-bit layers
    always). The last is the one the first two miss: under QLoRA the trainable and norm weights are float32 and no
    autocast runs, yet the quantized matmuls are bf16 (SmolLM2-135M QLoRA, 8 tokens: PPO's KL 0.0089 and approx_kl
    2.6e-5 at pi = ref; built-in tiny model, GRPO at temperature 3: ratio 1.0000031 on the first pass, when the
    log-probs came off the sampling pass)."""
    half = (torch.float16, torch.bfloat16)
    return (
        accelerator.mixed_precision in ("fp16", "bf16")
        or next(model.parameters()).dtype in half
        or quantized_compute_dtype(model) in half
    )


def quantized_compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a bitsandbytes-quantized model's layers compute in (4-bit: its compute dtype; 8-bit: float16), or
    None when the model is not quantized. `model`: a transformers model or a PEFT model around one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    q = getattr(inner.config, "quantization_config", None)
    if q is None or not (getattr(q, "load_in_4bit", False) or getattr(q, "load_in_8bit", False)):
        return None
    if getattr(q, "load_in_8bit", False):
        return torch.float16
    dtype = getattr(q, "bnb_4bit_compute_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def first_logged(path: Path, key: str) -> float | None:
    """`key` of the first metrics row (what a resumed run reports as its first score)."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[0].get(key) if rows else None


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def step_seed(seed: int, step: int, process_index: int) -> int:
    return (seed * 1_000_003 + step) * 1024 + process_index


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
