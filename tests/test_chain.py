"""One recipe chaining SFT (LoRA) -> DPO (LoRA) on the tiny model: the hand-off other tools get wrong.

Checks that learning happened in both stages, that the DPO policy continues the SFT adapter, and that the DPO
reference is the SFT model (not the raw base): the reference log-probs DPO cached on disk equal the ones of a
separately loaded SFT model, and DPO's first loss is ln 2 (policy == reference at step 0).
"""

import math

import pytest
import torch
from safetensors.torch import load_file

from alignlab.cli import main
from alignlab.contract import StageOutput
from tests.helpers import assert_reused, copy_run, sft_lora_recipe, write_yaml
from tests.helpers import rows as _metrics

pytestmark = pytest.mark.slow


DPO = {
    "name": "dpo",
    "type": "dpo",
    "dataset": {
        "path": "builtin:arith",
        "split": "preference",
        "size": 960,
        "eval_size": 96,
        "eval_split": "preference_eval",
    },  # pairs on held-out prompts
    "loss": {"name": "dpo", "beta": 0.2},
    "precompute_ref_logps": True,
    "train": {"epochs": 1, "per_device_batch_size": 16, "learning_rate": 2e-3, "max_length": 48, "logging_steps": 5},
}


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory, sft_lora_run):
    """`alignlab run` on SFT (LoRA, tests/helpers.py SFT_LORA) -> DPO. The SFT stage is the session's shared run,
    copied into this run's folder (so reused as finished, tests/helpers.py); everything checked of it below is what
    its training left."""
    tmp = tmp_path_factory.mktemp("chain")
    copy_run(sft_lora_run, tmp / "run")
    assert main(["run", write_yaml(tmp / "r.yaml", sft_lora_recipe(tmp / "run", DPO, name="chain"))]) == 0
    assert_reused(sft_lora_run, tmp / "run")
    return tmp / "run"


def test_sft_learned(chain_run):
    rows = _metrics(chain_run / "sft")
    first_loss = rows[0]["loss"]
    final = StageOutput.load(chain_run / "sft").metrics
    assert first_loss > 4.0  # an untrained model over a 747-token vocabulary: ~ln(747) = 6.6
    assert final["eval_loss"] < 0.35 * first_loss
    assert final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))


def test_dpo_continues_sft_adapter_and_learns(chain_run):
    sft, dpo = StageOutput.load(chain_run / "sft"), StageOutput.load(chain_run / "dpo")
    assert sft.kind == dpo.kind == "adapter" and dpo.base == sft.base
    rows = [r for r in _metrics(chain_run / "dpo") if "loss" in r and "final" not in r]
    # Step 1 is logged before any update: the policy (SFT adapter) equals the reference (frozen SFT adapter).
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # Pairs on held-out prompts: at step 0 every implicit reward is 0 (accuracy 0.5 at best, loss ln 2); after
    # one epoch the implicit reward ranks chosen above rejected well above chance.
    # (Measured: accuracy 0.875, eval loss 0.20, margin 11.2.)
    assert dpo.metrics["eval_rewards/accuracies"] >= 0.75
    assert dpo.metrics["eval_loss"] < math.log(2) - 0.15
    assert dpo.metrics["eval_rewards/margins"] > 0.5


def test_dpo_reference_is_the_sft_model(chain_run, tiny_model_path):
    """The reference log-probs DPO used (cached on disk) equal those of a separately loaded SFT model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import generate_task

    cache = sorted((chain_run / "dpo" / "ref_logps").glob("train-*.safetensors"))
    assert len(cache) == 1
    cached = load_file(cache[0])
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    sft = PeftModel.from_pretrained(base, str(chain_run / "sft" / "model")).eval()
    rows = generate_task("arith", "preference", 960, seed=0)
    for i in range(4):
        prompt = tok.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full_text = tok.apply_chat_template(rows[i]["prompt"] + rows[i]["chosen"], tokenize=False)
        full = tok(full_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(sft(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        token_logps = logp.gather(-1, targets[:, None])[:, 0]
        expected = token_logps[len(prompt_ids) - 1 :].sum().item()
        assert cached["ref_chosen_logps"][i].item() == pytest.approx(expected, abs=1e-3)
    # ... and they differ from the raw base model's, so the reference really is the SFT model.
    with torch.no_grad(), sft.disable_adapter():
        base_logp = torch.log_softmax(sft(input_ids=ids).logits[0, :-1].float(), -1)
    base_expected = base_logp.gather(-1, targets[:, None])[:, 0][len(prompt_ids) - 1 :].sum().item()
    assert abs(base_expected - expected) > 0.5


def test_rerun_skips_finished_stages_and_reuses_ref_cache(chain_run, capsys):
    before = (chain_run / "dpo" / "stage_output.json").stat().st_mtime_ns
    assert main(["run", str(chain_run.parent / "r.yaml")]) == 0
    assert (chain_run / "dpo" / "stage_output.json").stat().st_mtime_ns == before
