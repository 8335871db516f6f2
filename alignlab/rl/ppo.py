"""PPO for RLHF on accelerate: alignlab's own loop (TRL 1.x has no PPO trainer). The stage that builds its
inputs is alignlab/stages/ppo.py; the formulas are in alignlab/losses/ppo.py (see docs/algorithms.md).

One step = one rollout batch, then `epochs` passes of clipped PPO over minibatches of it:
  1. sample one response per prompt (left-padded prompts, temperature, up to max_new_tokens or EOS; no top-p:
     the recipe refuses it, see RolloutSpec);
  2. score each response (reward model or Python function); subtract `missing_eos_penalty` without EOS;
  3. log-probs (logits / temperature), values and entropy under the policy, read off the sampling pass itself
     (or, with rollout.recompute_logprobs, the default in low precision, from a separate forward over prompt +
     response), and log-probs under the reference (a forward); all under the PPO epochs' precision context;
  4. per-token rewards r_t = -kl_coef k1_t (k1 = log pi - log ref, whatever ppo.kl_estimator says: that key picks
     the estimator LOGGED as `kl`; see alignlab.losses.ppo.kl_estimate), plus the score on the LAST REAL response
     token (the EOS when the response has one, else its last sampled token);
  5. GAE -> advantages and returns (returns before whitening), advantages whitened over the batch;
  6. PPO epochs: loss = clipped policy loss + vf_coef clipped value loss; AdamW step per minibatch;
  7. KL controller update (adaptive: Ziegler et al.), with the batch's mean per-response KL (sum over tokens) as
     logged (ppo.kl_estimator).

Value function: a linear head on the policy's final hidden state (the lm_head's input), on the SAME backbone:
no second model. Its loss backpropagates into the policy's trainable weights too (the shared-trunk value head of
the original RLHF setups, Ziegler et al. 2019; vf_coef scales it). It starts from the reward model's score head
when one is given (same hidden size), else from zeros (V = 0: advantages start as plain rewards).

Randomness: prompts are drawn from a permutation per pass over the data that depends only on (seed, pass), and
every sampled response has its own random stream, seeded by (seed, its index in the run), so a resumed run samples
exactly what an uninterrupted one would. Dropout is set to 0 everywhere in the policy, for rollouts and updates
alike (PPO's ratio needs the same function twice). Checkpoints (`save_steps`): checkpoints/step-N holds the
trainable weights (adapter or full, and the value head), optimizer state, KL controller and step; written to a
temporary folder, marked complete, then renamed. The loop, the prompt stream, checkpoints, the NaN guard and the
process arithmetic are shared with GRPO: alignlab/rl/loop.py.

Several processes (`accelerate launch`): `rollout.batch_size` and `train.minibatch_size` are per process. Process p
takes the p-th slice of each step's prompts; advantages are whitened, token-mean losses normalised and metrics
(hence the KL controller's input) averaged over the GLOBAL batch, so P processes with batch B compute what one
process with batch P x B does, when each rollout batch is one minibatch (with several, the split into
minibatches is drawn per process: same distribution, not the same numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignlab.console import duration
from alignlab.generation import generate
from alignlab.logprobs import completion_logits, token_logprobs
from alignlab.losses import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from alignlab.rl.loop import RLTrainer, SamplingRecorder, ScoreFn, low_precision

log = logging.getLogger("alignlab")


class PolicyWithValueHead(nn.Module):
    """The policy LM plus a scalar value head on its final hidden state (captured from the lm_head's input, so
    every causal LM works and no hidden-state tuple is kept). forward -> (logits [B, C, V] / temperature,
    values [B, C]) for the last C tokens: position t holds the distribution of completion token t and the value
    of the state before it."""

    def __init__(self, policy: nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self._hidden: torch.Tensor | None = None
        self._capturing = False  # only this module's forward captures (not e.g. reference passes)
        self._step_values: list[torch.Tensor] | None = None  # set while recording a sampling pass
        policy.get_output_embeddings().register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        if self._capturing:
            self._hidden = args[0]
        elif self._step_values is not None:  # a decoding step: the state before the token it samples
            hidden = args[0][:, -1]
            self._step_values.append(self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float())

    @contextmanager
    def recording_values(self) -> Iterator[list[torch.Tensor]]:
        """While generate() runs the policy: a list that gets the value [B] of each decoding step's state."""
        self._step_values = []
        try:
            yield self._step_values
        finally:
            self._step_values = None

    def forward(self, input_ids, attention_mask, n_completion: int, temperature: float):
        self._capturing = True
        try:
            logits = completion_logits(self.policy, input_ids, attention_mask, n_completion, temperature)
        finally:
            self._capturing = False
        hidden = self._hidden[:, -(n_completion + 1) : -1]  # [B, C, H]
        self._hidden = None
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [B, P + C] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # [B, P + C]
    response: torch.Tensor  # [B, C] response tokens
    mask: torch.Tensor  # [B, C] float, 1 on real response tokens (EOS included)
    logprobs: torch.Tensor  # [B, C] under the policy that sampled (old log-probs)
    values: torch.Tensor  # [B, C]
    advantages: torch.Tensor  # [B, C] (whitened when asked)
    returns: torch.Tensor  # [B, C]


class PPOTrainer(RLTrainer):
    """Runs `steps` PPO updates (the loop, checkpoints and process arithmetic: alignlab/rl/loop.py). `reference`: a
    callable (input_ids, attention_mask, C) -> [B, C] reference log-probs (adapter disabled, the frozen "ref"
    adapter, or a frozen model: the stage decides)."""

    name, headline = "ppo", "score"

    def __init__(
        self,
        *,
        accelerator,
        model: PolicyWithValueHead,
        tokenizer,
        prompts: list,
        score_fn: ScoreFn,
        reference: Callable,
        spec,  # PPOSpec
        seed: int,
        stage_dir: Path,
        sharding=None,  # alignlab.parallel.Sharding
    ):
        super().__init__(
            accelerator=accelerator, policy=model.policy, tokenizer=tokenizer, prompts=prompts, reference=reference,
            spec=spec, seed=seed, stage_dir=stage_dir, sharding=sharding,
        )  # fmt: skip
        self.score_fn = score_fn
        self.ro, self.hp = spec.rollout, spec.ppo
        self._prepare(model, lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay, fused=True)
        self.kl_ctl = (
            AdaptiveKLController(self.hp.kl_coef, self.hp.kl_target, self.hp.kl_horizon)
            if self.hp.kl_target is not None
            else FixedKLController(self.hp.kl_coef)
        )

    @property
    def unwrapped(self) -> PolicyWithValueHead:
        return self.acc.unwrap_model(self.model)

    def train_step(self) -> dict[str, float]:
        samples = self._stream(self.ro.batch_size)
        prompts = [self.prompts[self._prompt_index(k)] for k in samples]
        with self._sampling():
            batch, stats = self.make_rollout(prompts, row_seeds=[self.seed * 1_000_003 + k for k in samples])
        stats.update(self.optimize(batch, torch.Generator().manual_seed(self._seed())))
        stats = self._mean_over_processes(stats)
        self.kl_ctl.update(stats["kl"], n_steps=self.ro.batch_size * self.acc.num_processes)
        return stats

    @torch.no_grad()
    def make_rollout(self, prompts: list, row_seeds: list[int]) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
        model = self.unwrapped
        recompute = self.ro.recompute_logprobs
        if recompute is None:  # in low precision, cached decoding drifts from the PPO epochs' full forward
            recompute = low_precision(self.acc, model.policy)
        recorder = None if recompute else SamplingRecorder(self.ro.temperature)
        # Every pass of the policy and the reference (sampling, recomputed log-probs and values, reference log-probs)
        # runs under the precision context of the PPO epochs' forward (accelerate's autocast under mixed_precision
        # bf16/fp16; a no-op otherwise): old, new and reference log-probs then come from the same arithmetic, so the
        # ratio is 1 and the KL 0 before any update.
        with self.acc.autocast(), model.recording_values() if recorder else nullcontext() as step_values:
            ro = generate(
                model.policy,
                self.tokenizer,
                prompts,
                max_new_tokens=self.ro.max_new_tokens,
                temperature=self.ro.temperature,
                top_p=self.ro.top_p,
                row_seeds=row_seeds,
                observe=recorder,
                end_ids=self.end_ids,
                synced=self.sharding.synced,
            )
        device = self.acc.device
        input_ids, attention_mask = ro.input_ids.to(device), ro.attention_mask.to(device)
        response, mask = ro.completion_ids.to(device), ro.completion_mask.to(device).float()
        n = response.shape[1]
        ended = ro.ended.to(device)

        scores = self.score_fn(prompts, ro.texts).to(device=device, dtype=torch.float32)  # [B]
        self._check_finite(torch.isfinite(scores).all(), "the reward (reward_fn / reward model) gave nan or inf scores")
        if self.ro.missing_eos_penalty is not None:
            scores = scores - self.ro.missing_eos_penalty * (~ended).float()

        rows = torch.arange(len(prompts), device=device).split(self.spec.forward_batch_size)
        if recorder is not None:  # off the sampling pass: step t's logits and state are those of response token t
            logprobs, entropy = (x.to(device) for x in recorder.finish(response))
            values = torch.stack(step_values, dim=1).to(device)
            if values.shape != response.shape:
                raise RuntimeError(f"sampling recorded {values.shape[1]} decoding steps for {n} response tokens")
        else:
            logprobs, values, entropy = [], [], []
            for idx in rows:
                with self.acc.autocast():
                    logits, v = model(input_ids[idx], attention_mask[idx], n, self.ro.temperature)
                logprobs.append(token_logprobs(logits, response[idx]))
                values.append(v.float())
                entropy.append(entropy_from_logits(logits))
            logprobs, values, entropy = (torch.cat(x) for x in (logprobs, values, entropy))
        with self.acc.autocast():
            ref_logprobs = torch.cat([self.reference(input_ids[idx], attention_mask[idx], n) for idx in rows])

        # Rewards: -kl_coef k1_t on every token, plus the score on the last real response token. Always k1 (a detached
        # k3 reward does not pull pi toward ref: see kl_estimate); ppo.kl_estimator only picks the logged `kl`.
        k1 = kl_estimate(logprobs, ref_logprobs, "k1") * mask  # [B, C]
        kl = kl_estimate(logprobs, ref_logprobs, self.hp.kl_estimator) * mask  # [B, C], logged
        rewards = -self.kl_ctl.value * k1
        last = mask.sum(dim=1).long() - 1  # [B]: a response has at least one token
        rewards[torch.arange(len(prompts), device=device), last] += scores
        advantages, returns = compute_gae(rewards, values, mask, self.hp.gamma, self.hp.lam)
        if self.hp.whiten_advantages:  # over the global batch (every process's responses)
            advantages = masked_whiten(advantages, mask, all_sum=self._all_sum)

        batch = RolloutBatch(input_ids, attention_mask, response, mask, logprobs, values, advantages, returns)
        share = self._share(mask.sum())  # token means below: averaged over processes, they are global token means
        stats = {
            "score": scores.mean(),
            "kl": kl.sum(dim=1).mean(),  # per response: sum over its tokens
            "non_score_reward": (rewards.sum(dim=1) - scores).mean(),
            "entropy": masked_mean(entropy, mask) * share,
            "response_length": mask.sum(dim=1).mean(),
            "eos_rate": ended.float().mean(),
            "value_mean": masked_mean(values, mask) * share,
            "kl_coef": torch.tensor(self.kl_ctl.value, device=device),
        }
        return batch, stats

    def optimize(self, batch: RolloutBatch, generator: torch.Generator) -> dict[str, float]:
        hp, n = self.hp, batch.response.shape[1]
        totals: dict[str, torch.Tensor] = {}
        count = 0
        self.model.train()
        for _ in range(self.spec.train.epochs):
            order = torch.randperm(len(batch.response), generator=generator).to(batch.response.device)
            for idx in order.split(self.spec.train.minibatch_size):
                with self.acc.autocast():  # as the rollout's passes (DDP's prepared forward has it too; sharded not)
                    logits, values = self.model(batch.input_ids[idx], batch.attention_mask[idx], n, self.ro.temperature)
                logprobs = token_logprobs(logits, batch.response[idx])
                mask = batch.mask[idx]
                pg, pg_stats = policy_loss(logprobs, batch.logprobs[idx], batch.advantages[idx], mask, hp.cliprange)
                vf, vf_stats = value_loss(
                    values.float(), batch.values[idx], batch.returns[idx], mask, hp.cliprange_value
                )
                # Token means over the global minibatch: DDP averages the processes' gradients, so each process
                # weighs its token mean by its share of the minibatch's tokens (1 in a single process).
                share = self._share(mask.sum())
                loss = (pg + hp.vf_coef * vf) * share
                self._update(loss, self.spec.train.max_grad_norm)
                step_stats = {
                    "policy_loss": pg.detach() * share,
                    "value_loss": vf.detach() * share,
                    "clipfrac": pg_stats["clipfrac"] * share,
                    "approx_kl": pg_stats["approx_kl"] * share,
                    "value_clipfrac": vf_stats["clipfrac"] * share,
                }
                for k, v in step_stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        return {k: v / count for k, v in totals.items()}

    def _log_line(self, row: dict[str, float]) -> None:
        left = duration(row["step_time"] * (self.spec.train.max_steps - self.step))  # at the last logged steps' pace
        log.info(
            "ppo step %d/%d: score %.4f kl %.4f entropy %.3f clipfrac %.3f len %.1f eos %.2f (%.2f s/step, %s left)",
            self.step, self.spec.train.max_steps, row["score"], row["kl"], row["entropy"], row["clipfrac"],
            row["response_length"], row["eos_rate"], row["step_time"], left,
        )  # fmt: skip

    def _extra_state(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def _load_extra_state(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
