"""DPO stage: direct preference optimisation, its robust and length-normalised variants (cdpo, rdpo, ipo, hinge,
drdpo, kldpo, wdpo, ln_dpo) and the reference-free simpo and orpo, on TRL's DPOTrainer, with the loss chosen by
name from alignlab.losses.

    accelerate launch -m alignlab run recipes/quickstart.yaml --stage dpo

TRL does the tokenisation, batching, reference handling and logging; `compute_loss` is replaced by a short
override that computes summed completion log-probs and calls `preference_loss` (no branching on loss names).
Reference model: the stage's INPUT model, frozen. After a LoRA/QLoRA SFT stage the policy continues the SFT
adapter and TRL keeps a frozen copy of it as adapter "ref" on the same backbone (no second model in memory);
after full fine-tuning the reference is a frozen copy of the input weights. `precompute_ref_logps: true`
computes reference log-probs once and caches them in <stage>/ref_logps/, keyed by the batches as fed (rows, their
order and selection, truncation to max_length), the reference weights and the precision, so a second or resumed
run reads them back (`--force` starts the stage over without them).
A reference-free loss (catalog flag needs_reference=False: simpo, orpo) gets no reference at all: no second model,
no frozen "ref" adapter copy, no reference forward (trl_compat.WithoutReference: TRL has no switch for it).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from trl import DPOConfig, DPOTrainer

from alignlab.console import progress
from alignlab.contract import StageContext
from alignlab.data import build_datasets
from alignlab.losses import chosen_nll, preference_loss, preference_loss_info, wdpo_penalty
from alignlab.models import load_stage_model, load_tokenizer
from alignlab.stages.trl_compat import (
    NO_REFERENCE,
    ReferenceLogpsHook,
    WithoutReference,
    deepspeed_reference_engine,
    log_metric,
    reference_weights_hash,
)
from alignlab.stages.trl_glue import GuardedTrainer, train_and_save, trainer_args

log = logging.getLogger("alignlab")


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe

    # Inputs
    model, base = load_stage_model(recipe, ctx.input)
    tokenizer = load_tokenizer(recipe, base)
    train_ds, eval_ds = build_datasets(spec.dataset, recipe, "dpo", tokenizer.chat_template is not None)

    # Trainer
    args = trainer_args(
        DPOConfig,
        ctx,
        spec.train,
        has_eval=eval_ds is not None,
        precompute_ref_log_probs=spec.precompute_ref_logps,
    )
    trainer = RegistryDPOTrainer(
        model=model,
        ref_model=None if preference_loss_info(spec.loss.name).needs_reference else NO_REFERENCE,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        loss_name=spec.loss.name,
        loss_params={"beta": spec.loss.beta, **spec.loss.params},
        nll_alpha=spec.nll_alpha,
        ref_cache_dir=ctx.stage_dir / "ref_logps",
    )

    # Train, save, report
    return train_and_save(trainer, ctx, base=base)


class RegistryDPOTrainer(GuardedTrainer, ReferenceLogpsHook, WithoutReference, DPOTrainer):
    """DPOTrainer whose loss comes from alignlab's registry. Only the loss computation, the on-disk cache of
    precomputed reference log-probs and the reference-free construction (ref_model=NO_REFERENCE) differ from TRL
    (and GuardedTrainer's checkpoints and nan/inf stop).
    All loss parameters, beta included, come in `loss_params`; how to feed the loss comes from its catalog entry
    (alignlab/losses/catalog.py), never from its name. `nll_alpha` > 0 adds RPO's NLL term on the chosen answers
    (alignlab.losses.chosen_nll) to whichever loss it is; the logs show it as `nll`."""

    def __init__(self, *args, loss_name: str, loss_params: dict, ref_cache_dir: Path, nll_alpha: float = 0.0, **kwargs):
        self.loss_name, self.loss_params, self.ref_cache_dir = loss_name, dict(loss_params), Path(ref_cache_dir)
        self.nll_alpha = nll_alpha  # RPO: + alpha * the chosen answers' per-token NLL
        self.loss_info = preference_loss_info(loss_name)
        penalty = self.loss_info.input_gradient_penalty  # WDPO: rho * ||d loss / d embeddings||^2
        self.penalty_weight = {**self.loss_info.params, **self.loss_params}[penalty] if penalty else 0.0
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        mask = inputs["completion_mask"][:, 1:]  # [2B, T-1]: log-prob of token t+1 is read at position t
        chosen, rejected = self._logps(model, inputs, mask, need_embeds=self.penalty_weight > 0 and model.training)
        if not self.loss_info.needs_reference:
            ref_chosen = ref_rejected = None  # e.g. SimPO, ORPO: no reference exists (see WithoutReference)
        elif "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
        nll = chosen_nll(chosen, mask.sum(1).chunk(2)[0]) if self.nll_alpha > 0 else None  # on the summed log-probs
        chosen, rejected, ref_chosen, ref_rejected = loss_inputs(
            self.loss_info.length_normalized, mask, chosen, rejected, ref_chosen, ref_rejected
        )
        params = dict(self.loss_params)
        if self.loss_info.batch_statistic and self.accelerator.num_processes > 1:
            params["gather"] = self.accelerator.gather  # e.g. KLDPO's batch mean is over every process's pairs
        loss, metrics = preference_loss(self.loss_name, chosen, rejected, ref_chosen, ref_rejected, **params)
        if self.penalty_weight > 0 and model.training:
            # WDPO: g_i = d(sum of per-pair losses)/d(embeddings); the batch loss is their mean, hence * B.
            with _math_sdpa():
                penalty = wdpo_penalty(loss * chosen.shape[0], self._embeds, create_graph=True)
            loss = loss + self.penalty_weight * penalty.mean()
            metrics[f"{self.loss_name}/penalty"] = penalty.detach().mean()
        if nll is not None:
            loss = loss + self.nll_alpha * nll
            metrics["nll"] = nll.detach()
        for key, value in metrics.items():  # over every process's pairs: a max is the max of the maxima
            reduce = torch.amax if key.endswith("_max") else torch.amin if key.endswith("_min") else torch.mean
            log_metric(self, mode, key, reduce(self.accelerator.gather(value.reshape(1))).item())
        return (loss, None) if return_outputs else loss

    def _logps(self, model, inputs, mask, need_embeds: bool):
        """Summed completion log-probs [B] of chosen and rejected (batch rows are [chosen; rejected])."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        kwargs = {
            k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
        }
        if need_embeds:
            # WDPO needs the input embeddings in the graph; frozen embeddings (LoRA) are made a leaf that wants grad.
            embeds = self.accelerator.unwrap_model(model).get_input_embeddings()(kwargs.pop("input_ids"))
            self._embeds = embeds if embeds.requires_grad else embeds.detach().requires_grad_(True)
            kwargs["inputs_embeds"] = self._embeds
        if need_embeds:
            # TRL's fused LM head has no double backward, so WDPO reads log-probs off plain logits.
            with _math_sdpa():
                logits = model(**kwargs, use_cache=False).logits[:, :-1].float()  # [2B, T-1, V]
            targets = labels[:, 1:].clamp(min=0)
            per_token = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        else:
            out = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True)
            per_token = out.log_probs[:, -mask.shape[1] :]  # [2B, T-1], zero where labels are -100
        return (per_token * mask).sum(dim=1).chunk(2)

    def precompute_reference_logps(self, dataset, name, batch_size):
        """Reference log-probs of every pair, computed once (each process its share, gathered in order) and cached
        on disk keyed by the tokenised data and the reference weights. Replaces TRL's version (through
        trl_compat.ReferenceLogpsHook), whose cache sits beside the dataset's arrow files: for an in-memory dataset
        that is a per-process temporary folder, which the other processes of a multi-process run cannot read."""
        key = _ref_logps_key(self, dataset, batch_size)
        path = self.ref_cache_dir / f"{name}-{key[:20]}.safetensors"
        if path.exists():
            log.info("reference log-probs for %s read from %s", name, path)
        else:
            model = self.ref_model or self.model
            if self.ref_model is None and self.is_deepspeed_enabled:  # as TRL: parameters not placed/gathered yet
                model = deepspeed_reference_engine(self)
            loader = self.accelerator.prepare(
                DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
            )
            chosen, rejected = [], []
            desc = f"reference log-probs ({name})"
            for batch in progress(loader, desc=desc, unit="batch", main_process=self.accelerator.is_main_process):
                logps = self.compute_ref_log_probs(model, batch)
                c, r = self.accelerator.gather_for_metrics(logps)  # drops the padding rows of the last batch
                chosen.append(c.cpu())
                rejected.append(r.cpu())
            if self.accelerator.is_main_process:
                path.parent.mkdir(parents=True, exist_ok=True)
                tensors = {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}
                save_file(tensors, str(path) + ".tmp")
                Path(str(path) + ".tmp").replace(path)
            self.accelerator.wait_for_everyone()
        cached = load_file(path)
        dataset = dataset.add_column("ref_chosen_logps", cached["ref_chosen_logps"].tolist())
        return dataset.add_column("ref_rejected_logps", cached["ref_rejected_logps"].tolist())


def loss_inputs(length_normalized: bool, mask, chosen, rejected, ref_chosen, ref_rejected):
    """The four [B] log-probs a loss is fed: the summed ones as given, or (catalog flag length_normalized: ipo,
    ln_dpo, simpo, orpo) each divided by its completion-token count, read off `mask` [2B, T-1] (rows [chosen;
    rejected]). References None (a reference-free loss) stay None; others are moved to the policy's device/dtype
    (precomputed ones come from the dataset as float64 on the CPU)."""
    refs = [None if r is None else r.to(chosen) for r in (ref_chosen, ref_rejected)]
    if length_normalized:
        # IPO on per-token averages is TRL's choice, confirmed with the IPO authors (docs/algorithms.md); ln_dpo
        # (Tulu 3), SimPO and ORPO are defined on them.
        n_c, n_r = mask.sum(1).clamp(min=1).chunk(2)
        chosen, rejected = chosen / n_c, rejected / n_r
        refs = [None if r is None else r / n for r, n in zip(refs, (n_c, n_r))]
    return chosen, rejected, *refs


def _math_sdpa():
    """Double backprop has no derivative through the fused SDPA kernels; the math backend has one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _ref_logps_key(trainer, dataset, batch_size: int) -> str:
    """Cache key of a dataset's reference log-probs: every batch exactly as the precompute feeds it (the collator's
    output: row order and selection, tokens after truncation to max_length, padding, masks), the reference
    weights (TRL's hash of the state dict, dtypes included) and the precision the forward runs in (mixed-precision
    autocast). Reading the arrow table instead misses a `select`/shuffle (an indices mapping over the same table)
    and the truncation, which the collator applies."""
    h = hashlib.sha256(f"{reference_weights_hash(trainer)}|{trainer.accelerator.mixed_precision}".encode())
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False):
        for name, value in sorted(batch.items()):
            if isinstance(value, torch.Tensor):
                h.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
                h.update(value.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
