"""Generate stage: sample from the input model, score the samples, write a dataset for a later stage.

    accelerate launch -m alignlab run recipes/smollm2_generate_dpo_lora.yaml --stage pairs

For every prompt of `dataset`, `rollout.num_samples` completions are sampled from the stage's input model (the previous
model-writing stage's output, or the base model) at `rollout.temperature`, and each is scored with `reward_fn` or
`reward_model`. The stage writes <run>/<stage>/data/train.jsonl, which a later stage reads with
`dataset: {path: "stage:<stage>"}`:
- `output: preference`: one pair per prompt, chosen = the best-scored sample, rejected = the worst (the first
  sample among equals). A prompt whose samples all score the same gives no pair (nothing to prefer), nor one whose
  best - worst is at most `min_margin`. Columns: prompt, chosen, rejected, chosen_score, rejected_score,
  score_margin (best - worst). score_margin is not the reward stage's `margin` column unless a recipe maps it
  (`columns: {margin: score_margin}`), since a Bradley-Terry margin is in other units.
- `output: sft`: best-of-N (rejection sampling): prompt, completion = the best sample, score; prompts whose best is
  below `min_score` are dropped. With `revise_fn`, every sample is first rewritten by that function (e.g.
  `builtin:constraints`: the model's own sentences laid out by code to meet the prompt's constraints) and scored as
  revised; among equal revised scores, the sample that scored higher before revision wins (the least rewritten).
  samples.jsonl keeps both texts and both scores.
Completions are the decoded text (special tokens stripped), as an assistant turn for chat prompts: the reading
stage templates them, so a sample that hit max_new_tokens without an end token is trained WITH one (a cut-off
answer).

Generate -> dpo -> generate -> dpo is iterative on-policy DPO: the second generate stage samples from the first
dpo stage's model (its input), and the second dpo stage's reference is its own input, that same model.

Randomness: sample j of prompt i draws from its own random stream (RowSeededSampler), seeded from the recipe seed,
the stage name, i and j, and prompts are batched in fixed groups of `rollout.batch_size`; the processes of a multi-process
run take every world_size-th group. So the samples, and the written dataset, are the same for any number of
processes. Writes also generation.json (counts and score statistics) and samples.jsonl (every sample and its score).

Speed: an adapter is folded into its base before sampling (models.merged_for_sampling: the same model, ~10% faster),
and `dtype: bfloat16` samples in bf16 (1.75x as fast on a CPU with AMX, faster on GPUs; the samples are then the
bf16 model's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import torch
from accelerate import PartialState

from alignlab.contract import StageContext, StageFailed, StageOutput
from alignlab.data import build_datasets, prompt_text
from alignlab.data.formats import STAGE_DATA_FILE
from alignlab.evaluation.stats import mean
from alignlab.generation import end_token_ids, generate, slow_half_precision_note
from alignlab.models import load_frozen_model, load_tokenizer, merged_for_sampling, output_tokenizer_dir, resolve_base
from alignlab.parallel import Sharding
from alignlab.rewards import (
    load_revise_fn,
    load_reward_fn,
    load_reward_model,
    revise_texts,
    reward_fn_scores,
    reward_model_scores,
)

log = logging.getLogger("alignlab")


def run(ctx: StageContext) -> StageOutput:
    spec, recipe, state = ctx.spec, ctx.recipe, PartialState()
    data_file = ctx.stage_dir / STAGE_DATA_FILE
    if state.is_main_process:  # an earlier attempt's data must never be read as this one's
        shutil.rmtree(data_file.parent, ignore_errors=True)
    state.wait_for_everyone()

    # Inputs: prompts, the model to sample from, the scorer.
    tokenizer = load_tokenizer(recipe, output_tokenizer_dir(recipe, ctx.input))
    rows = build_datasets(spec.dataset, recipe, "generate", tokenizer.chat_template is not None, with_eval=False)[0]
    prompts = list(rows["prompt"])
    sharding = Sharding(recipe.parallel_for(spec), state, f"stage '{spec.name}'")
    # an adapter folded in: faster, same model; sharded, placed on the device unit by unit
    model = merged_for_sampling(load_frozen_model(recipe, ctx.input, move=not sharding.enabled))
    if spec.rollout.dtype is not None:
        if note := slow_half_precision_note(spec.rollout.dtype, f"stages.{spec.name}.rollout.dtype", state.device):
            log.warning("%s", note)
        model = model.to(getattr(torch, spec.rollout.dtype))
    sharding.shard(model)
    score = _scorer(ctx)
    revise = load_revise_fn(spec.revise_fn) if spec.revise_fn else None

    # Sample and score: fixed groups of prompts, every world_size-th group on this process. Sharded, every process
    # takes as many turns as the busiest (gathering weights needs them all): a process with no group left only
    # gathers (once), or samples one prompt it throws away (per_layer: each layer gathers whenever it runs).
    groups = [
        list(range(i, min(i + spec.rollout.batch_size, len(prompts))))
        for i in range(0, len(prompts), spec.rollout.batch_size)
    ]
    mine = groups[state.process_index :: state.num_processes]
    turns = -(-len(groups) // state.num_processes) if sharding.enabled else len(mine)
    end_ids = end_token_ids(tokenizer, model)
    results, started = [], time.time()
    for g in range(turns):
        spare = g >= len(mine)  # a turn taken only to keep step with the other processes
        idx = [0] if spare else mine[g]
        batch = [prompts[i] for i in idx for _ in range(spec.rollout.num_samples)]
        seeds = [sample_seed(recipe.seed, spec.name, i, j) for i in idx for j in range(spec.rollout.num_samples)]
        with sharding.gathered(model):
            if spare and not sharding.synced:
                continue
            out = generate(
                model,
                tokenizer,
                batch,
                max_new_tokens=spec.rollout.max_new_tokens,
                temperature=spec.rollout.temperature,
                top_p=spec.rollout.top_p,
                row_seeds=seeds,
                end_ids=end_ids,
                synced=sharding.synced,
            )
        if spare:
            continue
        texts, scores = out.texts, score(batch, out.texts)
        if revise is not None:
            texts = revise_texts(revise, batch, out.texts, spec.revise_fn)
            raw_scores, scores = scores, score(batch, texts)
        ended = out.ended.tolist()
        for k, i in enumerate(idx):
            sl = slice(k * spec.rollout.num_samples, (k + 1) * spec.rollout.num_samples)
            results.append({"index": i, "texts": texts[sl], "scores": scores[sl], "ended": ended[sl]})
            if revise is not None:
                results[-1].update(raw_texts=out.texts[sl], raw_scores=raw_scores[sl])
        if state.is_main_process and (g + 1) % max(1, len(mine) // 10) == 0:
            log.info("generate %s: %d/%d prompt groups (%.0f s)", spec.name, g + 1, len(mine), time.time() - started)
    record = sharding.record(model)
    del model

    # Gather every process's prompts (in prompt order), build the dataset on the main process.
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    results = sorted(results, key=lambda r: r["index"])
    rows_out, summary = build_rows(prompts, results, spec)
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    if summary["rows"] == 0:
        raise StageFailed(f"no usable rows: {_empty_reason(spec, summary)}")
    if state.is_main_process:
        _write(ctx, rows_out, results, prompts, summary)
    state.wait_for_everyone()
    log.info(
        "generate %s: %d prompts x %d samples -> %d %s rows (%s)",
        spec.name,
        len(prompts),
        spec.rollout.num_samples,
        summary["rows"],
        spec.output,
        data_file,
    )
    return StageOutput(
        spec.name, "generate", path="", kind="none", base=resolve_base(recipe), metrics=metrics, parallel=record
    )


def sample_seed(seed: int, stage: str, prompt: int, sample: int) -> int:
    """The random stream of sample `sample` of prompt `prompt`: depends on nothing else (batch, process)."""
    digest = hashlib.sha256(f"{seed}/generate/{stage}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def build_rows(prompts: list, results: list[dict], spec) -> tuple[list[dict], dict]:
    """The dataset rows (module docstring) and a summary, from each prompt's samples and scores:
    results[k] = {"index": prompt index, "texts": [N], "scores": [N], "ended": [N]}, in prompt order."""
    rows = []
    for r in results:
        prompt, chat = prompts[r["index"]], isinstance(prompts[r["index"]], list)
        # A chat prompt's completions are written as assistant turns: an empty answer (the model ended at once) is
        # then a valid turn, and a telling rejected one. A plain-string prompt's empty completions are skipped,
        # since plain data cells must not be empty (alignlab.data).
        usable = [j for j in range(len(r["texts"])) if chat or r["texts"][j]]
        if not usable:
            continue
        scores, raw = r["scores"], r.get("raw_scores", r["scores"])
        best = max(usable, key=lambda j: (scores[j], raw[j], -j))  # the first of the best (the least revised)
        worst = min(usable, key=lambda j: (scores[j], j))  # the first of the worst

        def text(j: int, chat: bool = chat, texts: list = r["texts"]):
            return [{"role": "assistant", "content": texts[j]}] if chat else texts[j]

        if spec.output == "preference":
            margin = scores[best] - scores[worst]
            if margin > spec.min_margin:  # min_margin >= 0: ties never make a pair
                rows.append({
                    "prompt": prompt,
                    "chosen": text(best),
                    "rejected": text(worst),
                    "chosen_score": scores[best],
                    "rejected_score": scores[worst],
                    "score_margin": margin,
                })  # fmt: skip
        elif spec.min_score is None or scores[best] >= spec.min_score:
            rows.append({"prompt": prompt, "completion": text(best), "score": scores[best]})
    all_scores = [s for r in results for s in r["scores"]]
    best_scores = [max(r["scores"]) for r in results]
    summary = {
        "prompts": len(results),
        "num_samples": spec.rollout.num_samples,
        "rows": len(rows),
        "row_rate": len(rows) / len(results) if results else 0.0,
        "mean_score": mean(all_scores)["value"],
        "mean_best_score": mean(best_scores)["value"],
        "ties": sum(1 for r in results if max(r["scores"]) == min(r["scores"])),
        "ended_rate": sum(e for r in results for e in r["ended"]) / max(1, len(all_scores)),
        "distinct_rate": sum(len(set(r["texts"])) for r in results) / max(1, len(all_scores)),
    }
    if results and "raw_texts" in results[0]:
        summary["revised_rate"] = sum(t != u for r in results for t, u in zip(r["texts"], r["raw_texts"])) / max(
            1, len(all_scores)
        )
        summary["mean_score_before_revision"] = mean([s for r in results for s in r["raw_scores"]])["value"]
    if spec.output == "preference" and rows:
        summary["mean_margin"] = mean([r["score_margin"] for r in rows])["value"]
    return rows, summary


def _empty_reason(spec, summary: dict) -> str:
    if spec.output == "preference":
        return (
            f"none of the {summary['prompts']} prompts gave a pair ({summary['ties']} had all {spec.rollout.num_samples} "
            f"samples scored the same{'' if spec.min_margin == 0 else f', the rest a margin <= {spec.min_margin}'}). "
            f"Raise rollout.num_samples or rollout.temperature, use a reward with partial credit, or more prompts"
        )
    return (
        f"no prompt's best sample reached min_score = {spec.min_score} (mean best score "
        f"{summary['mean_best_score']:.3g}). Lower min_score or raise rollout.num_samples"
    )


def _scorer(ctx: StageContext):
    """(prompts, completions) -> list of float scores: the reward function, or the reward model."""
    spec, recipe = ctx.spec, ctx.recipe
    if spec.reward_fn:
        fn = load_reward_fn(spec.reward_fn)
        return lambda prompts, texts: reward_fn_scores(fn, prompts, texts, name=f"reward_fn {spec.reward_fn}")
    from alignlab.contract import checkpoint_output

    source = ctx.outputs.get(spec.reward_model) or checkpoint_output(recipe.resolve_path(spec.reward_model))
    rm, rm_tok = load_reward_model(recipe, source)
    return lambda prompts, texts: reward_model_scores(rm, rm_tok, prompts, texts, spec.rollout.batch_size).tolist()


def _write(ctx: StageContext, rows: list[dict], results: list[dict], prompts: list, summary: dict) -> None:
    """data/train.jsonl (atomically: a reader sees all rows or none), samples.jsonl and generation.json."""
    data_file = ctx.stage_dir / STAGE_DATA_FILE
    data_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_file.with_name(data_file.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, data_file)
    with (ctx.stage_dir / "samples.jsonl").open("w") as f:
        for r in results:
            f.write(json.dumps({"prompt": prompt_text(prompts[r["index"]]), **r}) + "\n")
    (ctx.stage_dir / "generation.json").write_text(json.dumps(summary, indent=2) + "\n")
