"""Knowledge distillation on accelerate: alignlab's own loop. The stage that builds its inputs is
alignlab/stages/distill.py; the losses are alignlab/losses/distill.py (formulas: docs/algorithms.md).

One step = one batch of `rollout.batch_size` rows (per process), then `train.epochs` passes over it in minibatches
(`train.minibatch_size` rows; default the whole batch), one AdamW step per minibatch:
  1. on-policy or offline: each step draws u ~ U(0, 1) from its own seeded generator (seed, step) and is on-policy
     when u < on_policy_share (GKD's lambda; mode offline: never, mode on_policy with share 1: always);
  2. offline: the rows' prompts and completions from the data (the completion cut after its first end token and
     at `rollout.max_new_tokens`); on-policy: the student samples one completion per prompt, every row with its own
     seeded random stream (generation.RowSeededSampler), at `rollout.temperature`;
  3. per minibatch: the teacher's logits over the completion (no grad), the student's (with grad), and the loss:
     the divergence of `loss.name` at `loss.temperature`, a mean over the completion tokens, plus
     `loss.nll_alpha` x the data's NLL on offline batches. Gradients reach the student through its logits only:
     a sampled completion is a fixed context (GKD's on-policy objective, which does not differentiate through
     the sampling).
Logged per step: the loss, `forward_kl` = KL(teacher || student) and `reverse_kl` per token at temperature 1 (the
models' own distributions, whatever the loss), `on_policy` (1 on on-policy steps), the completion length, and on
on-policy steps `teacher_nll`: the teacher's NLL per token of the student's samples (falls as the student writes
what the teacher would); on offline steps `nll`, the student's NLL of the data. Held-out: `eval_forward_kl`, the
forward KL on the held-out rows' completions, measured before step 1 and after the last.

Several processes: process p takes the p-th slice of each step's rows (the prompt stream of alignlab/rl/loop.py),
every sampled row's random stream depends only on (seed, its index in the run), the on-policy draw only on (seed,
step), and each process weighs its token mean by its share of the step's tokens (`_share`): P processes compute
what one process computes with P x batch_size rows. Resume: checkpoints/step-N (trainable weights, optimizer state,
step, the first held-out KL) and the seeded streams make a resumed run the uninterrupted one.

The teacher is held whole, frozen, on every process, in eval mode; it never samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignlab.evaluation.evaluator import split_last_turn, tokenize_completion
from alignlab.generation import completion_mask_from_ids, generate
from alignlab.logprobs import completion_logits, token_logprobs
from alignlab.losses.distill import distill_loss
from alignlab.rl.loop import RLTrainer, step_seed

log = logging.getLogger("alignlab")


@dataclass
class Example:
    """One row of the data: its prompt (chat messages or text) and, when the data has one, its completion."""

    prompt: object
    completion: object | None


def examples_of(rows) -> list[Example]:
    """Dataset rows (prompt, prompt + completion, or chat messages) -> Examples. A chat without a prompt column
    trains on its last assistant turn (the turns before it are the prompt)."""
    out = []
    for row in rows:
        if "messages" in row:
            out.append(Example(*split_last_turn(None, row["messages"])))
        else:
            out.append(Example(row["prompt"], row.get("completion")))
    return out


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion: torch.Tensor  # [B, C] right-padded
    mask: torch.Tensor  # [B, C] 1 on the completion's tokens, up to and including its first end token

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.mask.to(self.prompt_mask.dtype)], dim=1)

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(self.prompt_ids[idx], self.prompt_mask[idx], self.completion[idx], self.mask[idx])


def encode_examples(tokenizer, examples: list[Example], max_new_tokens: int, end_ids, device) -> Batch:
    """Prompt + completion rows as TRL's trainers tokenise them (evaluation.tokenize_completion), the prompts
    left-padded and the completions right-padded, each completion cut after its first end token and at
    max_new_tokens."""
    pad = tokenizer.pad_token_id
    prompts, completions = [], []
    for ex in examples:
        ids, n = tokenize_completion(tokenizer, ex.prompt, ex.completion)
        prompts.append(ids[:n])
        completions.append(ids[n : n + max_new_tokens] or [pad])
    width = max(len(c) for c in completions)
    completion = torch.tensor([c + [pad] * (width - len(c)) for c in completions])
    real = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    ends, _ = completion_mask_from_ids(completion, end_ids)
    enc = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    mask = ends * real
    return Batch(
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        completion.masked_fill(mask == 0, pad).to(device),
        mask.to(device),
    )


class DistillTrainer(RLTrainer):
    """Runs `train.max_steps` steps (the loop, checkpoints and process arithmetic: alignlab/rl/loop.py).
    `examples`: the training rows; `eval_examples`: held-out rows with completions (or None)."""

    name, headline = "distill", "forward_kl"

    def __init__(
        self,
        *,
        accelerator,
        policy: nn.Module,
        teacher: nn.Module,
        tokenizer,
        examples: list[Example],
        eval_examples: list[Example] | None,
        spec,  # DistillSpec
        seed: int,
        stage_dir: Path,
        sharding=None,  # alignlab.parallel.Sharding
    ):
        super().__init__(
            accelerator=accelerator, policy=policy, tokenizer=tokenizer, prompts=examples, reference=None, spec=spec,
            seed=seed, stage_dir=stage_dir, sharding=sharding,
        )  # fmt: skip
        self.teacher = teacher
        self.eval_examples = eval_examples or []
        self.first_eval: float | None = None
        self._prepare(policy, lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay)

    @property
    def policy(self) -> nn.Module:
        return self.unwrapped

    # ------------------------------------------------------------------------------------------------ a step

    def on_policy(self, step: int) -> bool:
        """Whether step `step` (0-based) samples from the student: a draw from the step's own generator."""
        share = self.spec.on_policy_rate
        if share >= 1.0 or share <= 0.0:
            return share >= 1.0
        # seed + 1: not the stream step_seed(seed, step, 0) gives process 0's minibatch shuffles
        generator = torch.Generator().manual_seed(step_seed(self.seed + 1, step, 0))
        return bool(torch.rand((), generator=generator) < share)

    def train_step(self) -> dict[str, float]:
        spec = self.spec
        on_policy = self.on_policy(self.step)
        stream = self._stream(spec.rollout.batch_size)
        examples = [self.prompts[self._prompt_index(k)] for k in stream]
        stats: dict[str, torch.Tensor] = {}
        if on_policy:
            with self._sampling(), self.acc.autocast():
                ro = generate(
                    self.policy, self.tokenizer, [ex.prompt for ex in examples],
                    max_new_tokens=spec.rollout.max_new_tokens, temperature=spec.rollout.temperature,
                    row_seeds=[self.seed * 1_000_003 + k for k in stream], end_ids=self.end_ids,
                    synced=self.sharding.synced,
                )  # fmt: skip
            device = self.acc.device
            batch = Batch(
                ro.prompt_ids.to(device), ro.prompt_mask.to(device), ro.completion_ids.to(device),
                ro.completion_mask.to(device),
            )  # fmt: skip
            stats["eos_rate"] = ro.ended.float().mean().to(device)
        else:
            batch = encode_examples(
                self.tokenizer, examples, spec.rollout.max_new_tokens, self.end_ids, self.acc.device
            )
        stats.update(self.optimize(batch, on_policy, torch.Generator().manual_seed(self._seed())))
        stats["on_policy"] = torch.tensor(float(on_policy))
        stats["response_length"] = batch.mask.sum(dim=1).float().mean()
        return self._mean_over_processes(stats)

    def optimize(self, batch: Batch, on_policy: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
        spec, loss_spec = self.spec, self.spec.loss
        rows = len(batch.completion)
        size = spec.train.minibatch_size or rows
        nll_alpha = 0.0 if on_policy else loss_spec.nll_alpha
        totals: dict[str, torch.Tensor] = {}
        count = 0
        self.model.train()
        for _ in range(spec.train.epochs):
            order = torch.arange(rows)
            if size < rows:  # several minibatches: a fresh split each epoch
                order = order[torch.randperm(rows, generator=generator)]
            for idx in order.split(size):
                part = batch.rows(idx.to(batch.completion.device))
                n = part.completion.shape[1]
                with torch.no_grad(), self.acc.autocast():
                    teacher = completion_logits(self.teacher, part.input_ids, part.attention_mask, n, 1.0)
                with self.acc.autocast():
                    student = completion_logits(self.model, part.input_ids, part.attention_mask, n, 1.0)
                vocab = min(student.shape[-1], teacher.shape[-1])  # rows past the tokenizer's: padding
                student, teacher = student[..., :vocab], teacher[..., :vocab]
                loss, step_stats = distill_loss(
                    student, teacher, part.mask, name=spec.loss_name, beta=loss_spec.jsd_beta,
                    temperature=loss_spec.temperature,
                )  # fmt: skip
                tokens = part.mask.sum()
                student_nll = -(token_logprobs(student, part.completion) * part.mask).sum() / tokens.clamp(min=1)
                if nll_alpha > 0:
                    loss = loss + nll_alpha * student_nll
                # DDP averages the processes' gradients: each weighs its token mean by its share of the tokens
                share = self._share(tokens)
                loss = loss * share
                self._update(loss, spec.train.max_grad_norm)
                step_stats.pop("divergence")  # = loss, but for the NLL term (logged apart)
                step_stats["loss"] = loss.detach() / share.clamp(min=1e-8)
                if on_policy:
                    with torch.no_grad():
                        teacher_lp = token_logprobs(teacher, part.completion)
                    step_stats["teacher_nll"] = -(teacher_lp * part.mask).sum() / tokens.clamp(min=1)
                else:
                    step_stats["nll"] = student_nll.detach()
                for k, v in step_stats.items():  # token means weighed to global ones (see _share)
                    totals[k] = totals.get(k, 0.0) + v * share
                count += 1
        return {k: v / count for k, v in totals.items()}

    # ------------------------------------------------------------------------------------------ held-out KL

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """KL(teacher || student) per token at temperature 1 on the held-out rows' completions (None without
        them). Every process computes it on every row (the same value everywhere, no communication)."""
        if not self.eval_examples:
            return None
        size = self.spec.train.minibatch_size or self.spec.rollout.batch_size
        total, tokens = 0.0, 0.0
        self.model.eval()
        for i in range(0, len(self.eval_examples), size):
            batch = encode_examples(
                self.tokenizer, self.eval_examples[i : i + size], self.spec.rollout.max_new_tokens, self.end_ids,
                self.acc.device,
            )  # fmt: skip
            n = batch.completion.shape[1]
            with self.acc.autocast():
                teacher = completion_logits(self.teacher, batch.input_ids, batch.attention_mask, n, 1.0)
                student = completion_logits(self.policy, batch.input_ids, batch.attention_mask, n, 1.0)
            vocab = min(student.shape[-1], teacher.shape[-1])
            _, stats = distill_loss(student[..., :vocab], teacher[..., :vocab], batch.mask, name="forward_kl")
            count = float(batch.mask.sum())
            total += float(stats["forward_kl"]) * count
            tokens += count
        self.model.train()
        return total / max(tokens, 1.0)

    def train(self, resume: bool = False) -> dict:
        """The loop (RLTrainer.train), with the held-out KL measured before the first step (kept in the
        checkpoints, so a resumed run reports the same first value) and after the last."""
        summary = super().train(resume=resume)
        final = self.evaluate()
        if final is not None:
            summary["eval_forward_kl"] = final
            summary["first_eval_forward_kl"] = self.first_eval
            log.info("distill: held-out KL(teacher || student) per token %.4f -> %.4f", self.first_eval, final)
        return summary

    def _resumed(self) -> None:
        if self.first_eval is None:  # a fresh run (a resumed one read it from the checkpoint)
            self.first_eval = self.evaluate()

    def _extra_state(self) -> dict:
        return {"first_eval_forward_kl": self.first_eval}

    def _load_extra_state(self, state: dict) -> None:
        self.first_eval = state.get("first_eval_forward_kl")

    def _log_line(self, row: dict[str, float]) -> None:
        log.info(
            "distill step %d/%d (on-policy share %.2f): loss %.4f, KL(teacher||student) %.4f, KL(student||teacher) "
            "%.4f, len %.1f (%.2fs)",
            self.step, self.spec.train.max_steps, row["on_policy"], row["loss"],
            row["forward_kl"], row["reverse_kl"], row["response_length"], row["step_time"],
        )  # fmt: skip
