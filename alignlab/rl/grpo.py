"""Critic-free RL (GRPO, Dr. GRPO, RLOO, DAPO's fixes) on accelerate: alignlab's own loop. The stage that builds
its inputs is alignlab/stages/grpo.py; the formulas are in alignlab/losses/grpo.py (see docs/algorithms.md).

One step = one batch of groups, then `train.epochs` passes of the clipped policy-gradient loss over it:
  1. take `rollout.batch_size` prompts (per process) and sample `rollout.num_samples` responses to each (a group), every
     response with its own seeded random stream (generation.RowSeededSampler): softmax(logits / temperature);
  2. score each response with every reward component (reward functions, a reward model), sum them with their
     weights; subtract `rollout.missing_eos_penalty` from a response without EOS;
  3. group-relative advantages (`advantage`), the same for every token of a response; count the groups whose
     rewards are all equal (advantage 0: no signal) and, with `skip_zero_std_groups`, give them weight 0 in the loss;
  4. the sampling policy's log-probs, read off the sampling pass itself (or recomputed by a forward, the default in
     low precision and with `rollout.dtype`: sampling from a bf16 copy, alignlab/rl/sampler.py), and the reference's
     log-probs when needed (beta > 0, stop_if.kl, or a watch step);
  5. the collapse watch: response length, share of repeated word 3-grams, KL to the reference (k3, summed over a
     response's tokens); every `watch_steps` a few samples go to samples.jsonl and the log; `stop_if` ends the run
     here, before the update, when a limit is passed (below);
  6. `train.epochs` passes of clipped policy gradient (+ beta k3) over minibatches of whole groups; AdamW step per
     minibatch.

The training forward computes each group's prompt once (GroupedPolicy): the prompts [N, P] run with a KV cache,
which is repeated G times and continued by the responses [N x G, C]; gradients flow through the cache into the
prompt's pass. Same logits as a forward over N x G prompt + response rows (the causal mask makes the prompt's
states independent of what follows), with N x P + N x G x C tokens instead of N x G x (P + C).

Precision: sampling, reference and training forwards run under accelerate's autocast (a no-op in fp32), so the
first pass's ratio is 1 and the first KL 0. In low precision (that autocast, a half-precision model, or a quantized
base computing in bf16/fp16: QLoRA; alignlab.rl.loop.low_precision) cached decoding drifts from the training forward,
so by default the old log-probs are recomputed with it. Dropout is set to 0 (the ratio needs the same function
twice).

Several processes (`accelerate launch`): process p takes the p-th `rollout.batch_size` prompts of each step's
stream, so a group lives on one process (its statistics need no communication) and every response's random stream
depends only on (seed, its index in the run): P processes sample what one process does with P x rollout.batch_size.
Each process scales its loss by its share of the global denominator (responses or tokens, after dropping groups),
so the gradient DDP averages is the one-process gradient when each step is one minibatch. Metrics are averaged
over processes. Resume: checkpoints/step-N (trainable weights, optimizer state, step; written to a temporary folder,
marked complete, renamed) and the seeded streams make a resumed run the uninterrupted one. The loop, the prompt
stream, checkpoints, the NaN guard and the process arithmetic are shared with PPO: alignlab/rl/loop.py.

stop_if: the collapse guard (alignlab/rl/collapse.py) checks each step's samples (and greedy answers) before its
update; when a limit is passed, the step returns Stop and the stage ends on the newest weights that passed.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignlab.data import prompt_text
from alignlab.evaluation.repetition import repeated_ngram_share
from alignlab.generation import generate, slow_half_precision_note
from alignlab.logprobs import token_logprobs
from alignlab.losses import aggregation_count, entropy_from_logits, group_advantages, grpo_loss, zero_std_groups
from alignlab.losses.ppo import kl_estimate
from alignlab.losses.sft import token_unlikelihood
from alignlab.rl.collapse import CollapseGuard
from alignlab.rl.loop import Reference, RLTrainer, SamplingRecorder, ScoreFn, Stop, low_precision
from alignlab.rl.sampler import LowPrecisionSampler

log = logging.getLogger("alignlab")


@dataclass
class RewardComponent:
    name: str  # logged as reward/<name>
    weight: float
    score: ScoreFn


@dataclass
class GroupBatch:
    """One step's responses, group by group: rows g*G ... g*G + G - 1 answer prompt g."""

    prompt_ids: torch.Tensor  # [N, P] each group's prompt once (left-padded)
    prompt_mask: torch.Tensor  # [N, P]
    response: torch.Tensor  # [B, C]
    mask: torch.Tensor  # [B, C] float, 1 on real response tokens (EOS included)
    logprobs: torch.Tensor  # [B, C] under the policy that sampled
    ref_logprobs: torch.Tensor | None  # [B, C], when the step needs the reference
    advantages: torch.Tensor  # [B]
    weights: torch.Tensor  # [B] 1, or 0 for a dropped (zero-std) group


class GroupedPolicy(nn.Module):
    """The policy, run on groups: forward(prompt_ids [N, P], prompt_mask [N, P], response [N x G, C], response_mask
    [N x G, C], G, temperature) -> [N x G, C, V] float logits / temperature predicting each response token, with each
    prompt computed once (see the module docstring). Left-padded prompts: positions count real tokens only, as
    generate() counted them; padding columns shared by every prompt are dropped first."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        # transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache` (the old name still works,
        # with a deprecation warning); older 5.x releases only know the old one.
        self._cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"

    def forward(self, prompt_ids, prompt_mask, response, response_mask, group_size: int, temperature: float):
        start = int(prompt_mask.any(dim=0).int().argmax())
        prompt_ids, prompt_mask = prompt_ids[:, start:], prompt_mask[:, start:]
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.policy(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        first = out.logits.repeat_interleave(group_size, dim=0)  # [N x G, 1, V]: predicts response token 0
        if response.shape[1] == 1:
            return first.float() / temperature
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        cache.batch_repeat_interleave(group_size)  # [N, ...] -> [N x G, ...], differentiable
        prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
        lengths = prompt_mask.sum(dim=1, keepdim=True)  # [N x G, 1] real prompt tokens
        steps = response[:, :-1]  # token t predicts token t + 1
        positions = lengths + torch.arange(steps.shape[1], device=steps.device)[None, :]
        rest = self.policy(
            input_ids=steps,
            attention_mask=torch.cat([prompt_mask, response_mask[:, :-1].to(prompt_mask.dtype)], dim=1),
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: cache},
        ).logits  # [N x G, C - 1, V]
        return torch.cat([first, rest], dim=1).float() / temperature


class GRPOTrainer(RLTrainer):
    """Runs `spec.train.max_steps` updates (the loop, checkpoints and process arithmetic: alignlab/rl/loop.py). `reference`:
    (input_ids, attention_mask, C) -> [B, C] reference log-probs, or None when nothing asks for them (beta 0, no
    watch, no stop_if.kl)."""

    name, headline = "grpo", "reward"

    def __init__(
        self,
        *,
        accelerator,
        policy: nn.Module,
        tokenizer,
        prompts: list,
        rewards: list[RewardComponent],
        reference: Reference | None,
        spec,  # GRPOSpec
        seed: int,
        stage_dir: Path,
        sharding=None,  # alignlab.parallel.Sharding
    ):
        super().__init__(
            accelerator=accelerator, policy=policy, tokenizer=tokenizer, prompts=prompts, reference=reference,
            spec=spec, seed=seed, stage_dir=stage_dir, sharding=sharding,
        )  # fmt: skip
        self.rewards = rewards
        self.agg = spec.aggregation
        self._prepare(GroupedPolicy(policy), lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay)
        self.sampler = None
        if spec.rollout.dtype:
            if note := slow_half_precision_note(
                spec.rollout.dtype, f"stages.{spec.name}.rollout.dtype", accelerator.device
            ):
                log.warning("%s", note)
            self.sampler = LowPrecisionSampler(policy, getattr(torch, spec.rollout.dtype))
        self.guard = CollapseGuard(self, spec, prompts)  # stop_if
        self.guard.start()
        self.samples_path = self.stage_dir / "samples.jsonl"
        self.logs.append(self.samples_path)
        self.kl_trend: list[tuple[int, float]] = []  # (step, KL) at each step it was measured

    @property
    def unwrapped(self) -> GroupedPolicy:
        return self.acc.unwrap_model(self.model)

    @property
    def policy(self) -> nn.Module:
        """The policy model itself (what generates, and what the stage saves)."""
        return self.unwrapped.policy

    def _resumed(self) -> None:
        if self.metrics_path.exists():
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
            self.kl_trend = [(r["step"], r["kl"]) for r in rows if "kl" in r]

    def train_step(self) -> dict[str, float] | Stop:
        """One step: sample and score the groups, watch, then update; a passed stop_if limit ends the run here, before
        the update (Stop, with the collapse guard's summary entries)."""
        step = self.step + 1  # 1-based, as logged
        watch = self.spec.watch_steps is not None and (step == 1 or step % self.spec.watch_steps == 0)
        with self._sampling():
            batch, stats, texts, prompts, rewards = self.make_groups(watch)
        stats = self._mean_over_processes(stats)
        if watch or "kl" in stats:
            self._watch(step, stats, texts, prompts, rewards, show=watch)
        if self.guard.probe_due():  # the weights are the input model's or the checkpoint just written
            stats["greedy_repetition"] = self.guard.greedy_repetition()
        reason = self.guard.reason(stats)
        if reason is not None:
            return Stop(self.guard.stop(reason))
        stats.update(self._mean_over_processes(self.optimize(batch, torch.Generator().manual_seed(self._seed()))))
        return stats

    @torch.no_grad()
    def make_groups(self, watch: bool):
        spec, ro_spec, device = self.spec, self.spec.rollout, self.acc.device
        size = ro_spec.num_samples
        stream = self._stream(ro_spec.batch_size)  # this process's prompts in the run's stream
        prompts = [self.prompts[self._prompt_index(k)] for k in stream for _ in range(size)]
        row_seeds = [self.seed * 1_000_003 + k * size + j for k in stream for j in range(size)]
        recompute = ro_spec.recompute_logprobs
        if recompute is None:  # in low precision, cached decoding drifts from the training forward
            recompute = self.sampler is not None or low_precision(self.acc, self.policy)
        recorder = None if recompute else SamplingRecorder(ro_spec.temperature)
        model = self.policy if self.sampler is None else self.sampler.refresh(self.policy)
        with self.acc.autocast():
            ro = generate(
                model, self.tokenizer, prompts, max_new_tokens=ro_spec.max_new_tokens, temperature=ro_spec.temperature,
                row_seeds=row_seeds, observe=recorder, end_ids=self.end_ids, synced=self.sharding.synced,
            )  # fmt: skip
        input_ids, attention_mask = ro.input_ids.to(device), ro.attention_mask.to(device)
        prompt_ids, prompt_mask = ro.prompt_ids[::size].to(device), ro.prompt_mask[::size].to(device)  # [N, P]
        response, mask = ro.completion_ids.to(device), ro.completion_mask.to(device).float()
        ended, n = ro.ended.to(device), response.shape[1]

        # Rewards: the weighted sum of the components (each logged), minus the missing-EOS penalty.
        stats: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(prompts), device=device)
        for c in self.rewards:
            scores = c.score(prompts, ro.texts).to(device=device, dtype=torch.float32)  # [B]
            self._check_finite(torch.isfinite(scores).all(), f"reward '{c.name}' gave nan or inf scores")
            stats[f"reward/{c.name}"] = scores.mean()
            total = total + c.weight * scores
        if ro_spec.missing_eos_penalty is not None:
            total = total - ro_spec.missing_eos_penalty * (~ended).float()
        grouped = total.view(ro_spec.batch_size, size)  # [N, G]
        advantages = group_advantages(grouped, spec.advantage).flatten()  # [B]
        flat = zero_std_groups(grouped)  # [N]
        weights = torch.ones_like(total)
        if spec.skip_zero_std_groups:
            weights = (~flat).float().repeat_interleave(size)

        rows = torch.arange(len(prompts), device=device).split(ro_spec.forward_batch_size or self._minibatch)
        if recorder is not None:  # off the sampling pass: step t's logits are those of response token t
            logprobs, entropy = (x.to(device) for x in recorder.finish(response))
        else:  # the training forward's arithmetic, on whole groups
            logprobs, entropy = [], []
            per_chunk = max(1, (ro_spec.forward_batch_size or self._minibatch) // size)
            for g in range(0, ro_spec.batch_size, per_chunk):
                groups, idx = slice(g, g + per_chunk), slice(g * size, (g + per_chunk) * size)
                with self.acc.autocast():
                    logits = self.unwrapped(
                        prompt_ids[groups], prompt_mask[groups], response[idx], mask[idx], size, ro_spec.temperature
                    )
                logprobs.append(token_logprobs(logits, response[idx]))
                entropy.append(entropy_from_logits(logits))
            logprobs, entropy = torch.cat(logprobs), torch.cat(entropy)
        ref_logprobs = None
        if self.reference is not None and (spec.beta > 0 or watch or (spec.stop_if and spec.stop_if.kl)):
            with self.acc.autocast():
                ref_logprobs = torch.cat([self.reference(input_ids[idx], attention_mask[idx], n) for idx in rows])

        batch = GroupBatch(prompt_ids, prompt_mask, response, mask, logprobs, ref_logprobs, advantages, weights)
        lengths = mask.sum(dim=1)
        stats.update(
            reward=total.mean(),
            reward_std=grouped.std(dim=1).mean(),  # within-group spread: what the advantages are made of
            zero_std_groups=flat.float().mean(),  # share of groups with no signal
            response_length=lengths.mean(),
            eos_rate=ended.float().mean(),
            entropy=(entropy * mask).sum() / lengths.sum().clamp_min(1.0) * self._share(lengths.sum()),
            repetition=torch.tensor(sum(map(repeated_ngram_share, ro.texts)) / len(ro.texts), device=device),
        )
        if ref_logprobs is not None:  # per response: k3 summed over its tokens, as PPO logs kl
            stats["kl"] = (kl_estimate(logprobs, ref_logprobs, "k3") * mask).sum(dim=1).mean()
        return batch, stats, ro.texts, prompts, total

    def optimize(self, batch: GroupBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        spec = self.spec
        if self._all_sum(batch.weights.sum()).item() == 0:  # every group of every process dropped: no update
            return {"skipped_update": torch.tensor(1.0, device=batch.weights.device)}
        totals: dict[str, torch.Tensor] = {}
        count = 0
        self.model.train()
        temperature, size, groups = spec.rollout.temperature, spec.rollout.num_samples, len(batch.prompt_ids)
        for _ in range(spec.train.epochs):
            order = torch.arange(groups, device=batch.response.device)
            if self._minibatch < groups * size:  # several minibatches (of whole groups): a fresh split each epoch
                order = order[torch.randperm(groups, generator=generator).to(order.device)]
            for chosen in order.split(self._minibatch // size):
                idx = (chosen[:, None] * size + torch.arange(size, device=chosen.device)[None, :]).flatten()  # rows
                with self.acc.autocast():
                    logits = self.model(
                        batch.prompt_ids[chosen], batch.prompt_mask[chosen], batch.response[idx], batch.mask[idx],
                        size, temperature,
                    )  # fmt: skip
                mask, weights = batch.mask[idx], batch.weights[idx]
                logprobs, ul = token_logprobs(logits, batch.response[idx]), None
                if spec.unlikelihood > 0:  # on the model's own distribution (temperature 1), as greedy decoding sees it
                    raw = logits if temperature == 1.0 else logits * temperature
                    ul = token_unlikelihood(torch.log_softmax(raw, dim=-1), batch.response[idx], mask)
                loss, stats = grpo_loss(
                    logprobs, batch.logprobs[idx], batch.advantages[idx], mask,
                    clip_low=spec.clip_low, clip_high=spec.clip_high, loss_agg=self.agg,
                    max_length=spec.rollout.max_new_tokens,
                    ref_logprobs=batch.ref_logprobs[idx] if spec.beta > 0 else None, beta=spec.beta, weights=weights,
                    unlikelihood=ul, ul_alpha=spec.unlikelihood,
                )  # fmt: skip
                # DDP averages the processes' gradients: each process weighs its loss by its share of the global
                # denominator (responses or tokens kept), so the average is the loss over every process's rows.
                share = self._share(aggregation_count(mask, self.agg, weights))
                loss = loss * share
                self._update(loss, spec.train.max_grad_norm)
                tokens = self._share((mask * weights[:, None]).sum())  # metrics are token means: global ones
                step_stats = {"policy_loss": loss.detach(), **{k: v * tokens for k, v in stats.items() if k != "kl"}}
                for k, v in step_stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in totals.items()}

    # ------------------------------------------------------------------------------------------ collapse watch

    def _watch(self, step: int, stats: dict, texts: list[str], prompts: list, rewards: torch.Tensor, show: bool):
        if "kl" in stats:
            self.kl_trend.append((step, stats["kl"]))
        if not show or not self.acc.is_main_process:
            return
        trend = " -> ".join(f"{v:.3g}" for _, v in self.kl_trend[-4:]) or "not measured (no reference)"
        log.info(
            "grpo watch step %d: reward %.4f, response length %.1f, repeated 3-grams %.3f, KL to reference %s",
            step, stats["reward"], stats["response_length"], stats["repetition"], trend,
        )  # fmt: skip
        size = self.spec.rollout.num_samples
        rows = []
        for g in range(min(self.spec.watch_samples, self.spec.rollout.batch_size)):
            i = g * size  # the first response of each of the first groups
            rows.append(
                {"step": step, "prompt": prompt_text(prompts[i]), "completion": texts[i], "reward": float(rewards[i])}
            )
            log.info("  sample %d: %r -> %r (reward %.3f)", g + 1, rows[-1]["prompt"], texts[i], rows[-1]["reward"])
        self.samples_path.parent.mkdir(parents=True, exist_ok=True)
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    @torch.no_grad()
    def decode_greedy(self, prompts: list) -> list[str]:
        """The policy's greedy answers to `prompts` (the collapse guard's probe), decoded as the eval decodes."""
        with self._sampling(), self.acc.autocast():
            ro = generate(
                self.policy, self.tokenizer, prompts, max_new_tokens=self.spec.rollout.max_new_tokens,
                temperature=0.0, end_ids=self.end_ids, synced=self.sharding.synced,
            )  # fmt: skip
        return ro.texts

    def train(self, resume: bool = False) -> dict:
        """The loop (RLTrainer.train), then the collapse guard's probe of the final weights."""
        summary = super().train(resume=resume)
        if "stop_reason" not in summary:
            summary.update(self.guard.final_check())
        return summary

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def _minibatch(self) -> int:
        return self.spec.train.minibatch_size or self.spec.responses_per_step

    def _log_line(self, row: dict[str, float]) -> None:
        log.info(
            "grpo step %d/%d: reward %.4f (std in groups %.3f, flat groups %.2f) len %.1f eos %.2f clip %.3f/%.3f "
            "(%.2fs)",
            self.step, self.spec.train.max_steps, row["reward"], row["reward_std"], row["zero_std_groups"],
            row["response_length"], row["eos_rate"], row.get("clip_low_frac", 0.0), row.get("clip_high_frac", 0.0),
            row["step_time"],
        )  # fmt: skip
