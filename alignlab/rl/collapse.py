"""GRPO's collapse guard (`stop_if`): watch each step's samples, probe the greedy answers of each checkpoint, and,
when a limit is passed, end the stage on the newest weights that passed. The loop (alignlab/rl/grpo.py) asks it at
each step; the guard never raises to stop the run, it returns what the run's summary records.

The rule: a limit passed on step s's samples says the weights after s - 1 updates have collapsed; those after s - 2
updates produced step s - 1's samples, which passed. The stage ends with the newest complete checkpoint at step
<= s - 2 as its model, or with its input weights when no such checkpoint is left (they passed step 1's checks), and
records why (`stop_reason`); it fails (StageFailed) only when the input itself fails step 1's checks.

stop_if.greedy_repetition probes the weights a checkpoint holds: before step 1 (the input model) and on the step
after each checkpoint is written (its weights, not yet updated), so a failed probe at step s condemns the weights
after s - 1 updates, and the newest checkpoint at or before s - 2 passed its own probe: the rule above. The final
weights are probed after the last step.
"""

from __future__ import annotations

import logging
import os

from alignlab.checkpoints import complete_checkpoints, step_of
from alignlab.contract import StageFailed
from alignlab.evaluation.repetition import repeated_ngram_share
from alignlab.rl.loop import trainable_state

log = logging.getLogger("alignlab")


class CollapseGuard:
    """stop_if of a GRPO stage over `trainer` (a GRPOTrainer: its step, weights, checkpoints and greedy decoding)."""

    def __init__(self, trainer, spec, prompts: list):
        self.trainer, self.spec, self.limits = trainer, spec, spec.stop_if
        self.greedy_limit = self.limits.greedy_repetition if self.limits is not None else None
        n = min(spec.greedy_prompts, len(prompts))  # fixed, evenly spaced training prompts
        self.probe_prompts = [prompts[i * len(prompts) // n] for i in range(n)] if self.greedy_limit else []
        # the fallback: the input's trainable weights (adapter, or the full model), written before a resume loads a
        # checkpoint
        self.input_path = trainer.ckpt_dir / "input.safetensors"

    @property
    def active(self) -> bool:
        return self.limits is not None

    def start(self) -> None:
        """Keep the input weights, the model to end on when no checkpoint passed."""
        if not self.active:
            return
        from safetensors.torch import save_file

        t = self.trainer
        weights = t.sharding.full_state(t.unwrapped, True) if t.sharding.enabled else None  # gathered when sharded
        if t.acc.is_main_process:
            t.ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.input_path.with_suffix(".tmp")
            save_file(weights if weights is not None else trainable_state(t.unwrapped), str(tmp))
            os.replace(tmp, self.input_path)
        t.acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------------ checks

    def probe_due(self) -> bool:
        """Whether this step probes greedy answers: the weights are the input's or a checkpoint's just written."""
        return self.greedy_limit is not None and self.trainer.step % self.spec.train.save_steps == 0

    def greedy_repetition(self) -> float:
        """Mean share of repeated word 3-grams of the policy's greedy answers to the probe prompts (what the eval's
        repetition measures, on greedy answers as the eval decodes). Every process decodes the same prompts with the
        same weights: the same value everywhere, no communication."""
        texts = self.trainer.decode_greedy(self.probe_prompts)
        shares = [repeated_ngram_share(t) for t in texts]
        value = sum(shares) / len(shares)
        if self.trainer.acc.is_main_process:
            looped = texts[shares.index(max(shares))]
            log.info(
                "grpo greedy probe after %d updates: repeated 3-grams %.3f on %d prompts (most: %r)",
                self.trainer.step, value, len(shares), looped[:160],
            )  # fmt: skip
        return value

    def reason(self, stats: dict) -> str | None:
        """Why step `trainer.step + 1`'s statistics pass a limit, or None."""
        limits = self.limits
        if limits is None:
            return None
        step = self.trainer.step + 1
        if limits.repetition is not None and stats["repetition"] > limits.repetition:
            return (
                f"the share of repeated word 3-grams in step {step}'s responses is {stats['repetition']:.3f}, "
                f"above stop_if.repetition = {limits.repetition}"
            )
        if limits.kl is not None and stats.get("kl", 0.0) > limits.kl:
            return (
                f"the KL to the reference on step {step}'s responses is {stats['kl']:.3f} nats per response, above "
                f"stop_if.kl = {limits.kl}"
            )
        if self.greedy_limit is not None and stats.get("greedy_repetition", 0.0) > self.greedy_limit:
            return self._greedy_reason(f"at step {step}", stats["greedy_repetition"])
        return None

    def final_check(self) -> dict:
        """After the last step: probe the final weights; when they fail, end on the newest checkpoint (each passed
        its probe), or on the input model when none is left. Returns the summary's entries."""
        if self.greedy_limit is None:
            return {}
        value = self.greedy_repetition()
        out = {"final_greedy_repetition": value}
        if value > self.greedy_limit:
            out.update(self.stop(self._greedy_reason("of the final weights", value)))
        return out

    def _greedy_reason(self, when: str, value: float) -> str:
        return (
            f"the greedy answers to {len(self.probe_prompts)} training prompts {when} (after {self.trainer.step} "
            f"updates) repeat word 3-grams at a share of {value:.3f}, above stop_if.greedy_repetition = "
            f"{self.greedy_limit}"
        )

    # ----------------------------------------------------------------------------------------------- restore

    def stop(self, reason: str) -> dict:
        """Step s = trainer.step + 1 failed (s = max_steps + 1: the final weights failed the greedy probe): load the
        newest checkpoint at step <= s - 2, or the input weights when none is left (module doc); the summary's
        entries."""
        t, train = self.trainer, self.spec.train
        failed, steps = t.step + 1, train.max_steps
        at = f"grpo stopped at step {min(failed, steps)} of {steps}: {reason}"
        if failed == 1:
            raise StageFailed(
                f"{at}. The input model itself fails this check, before any update: raise the limit, or start from "
                f"a model that passes it."
            )
        good = [p for p in complete_checkpoints(t.ckpt_dir, "step") if step_of(p) <= failed - 2]
        if good:
            keep = max(good, key=step_of)
            t.load_checkpoint(keep)
            message = (
                f"{at}. The stage's model is the last good checkpoint, {keep} (step {t.step}), whose weights passed "
                f"the checks of step {t.step + 1}."
            )
        else:
            from safetensors.torch import load_file

            t.sharding.load_full_state(t.unwrapped, load_file(str(self.input_path), device=str(t.acc.device)))
            t.step = 0
            message = (
                f"{at}. The stage's model is its input model, whose weights passed the checks of step 1: no checkpoint "
                f"at or before step {failed - 2} is left (train.save_steps {train.save_steps}, "
                f"train.save_total_limit {train.save_total_limit}). Lower train.learning_rate (now "
                f"{train.learning_rate}) or raise beta (now {self.spec.beta}); save more often."
            )
        log.warning("%s", message)
        return {"stop_reason": message, "stopped_at_step": min(failed, steps), "kept_checkpoint_step": t.step}
