"""The distill stage (alignlab/stages/distill.py, loop alignlab/rl/distill.py) on the built-in tiny model.

Default tier (a teacher given by path, builtin:tiny-llama; the student a randomly initialised model of the same
architecture and tokenizer, so the KL to the teacher starts large and a dozen steps show learning):
- offline: the held-out KL(teacher || student) per token falls by more than half, the training KL falls, and the
  logged loss is the divergence plus nll_alpha x the data's NLL;
- on-policy with on_policy_share 1/2: the steps that sampled are those the seeded per-step draw names (both kinds
  occur), the teacher's NLL of the student's samples and the held-out KL fall;
- errors before any model loads: a teacher whose tokenizer maps ids to other text, prompts without completions for
  offline steps, loss keys that do not fit the mode.
Slow tier: a LoRA student from the base after the shared LoRA SFT stage as teacher (an earlier stage), and resume
equal to the uninterrupted run. Two processes = one: tests/test_multiprocess.py.
"""

import json
import shutil

import pytest
import torch

from alignlab.data import DataError
from alignlab.recipe import RecipeError, parse_recipe
from tests.helpers import TINY, assert_reused, copy_run, make_recipe, sft_lora_recipe, steps
from tests.helpers import rows as _rows
from tests.helpers import run as _run


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_student(tiny_model_path, tmp_path_factory):
    """A model folder: the tiny model's architecture and tokenizer, randomly initialised (seed 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("student") / "random-tiny"
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_path)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(folder)
    return folder


def _distill(**keys) -> dict:
    stage = {
        "name": "distill",
        "type": "distill",
        "teacher": TINY,
        "dataset": {"path": "builtin:arith", "split": "sft", "size": 256, "eval_size": 24},
        "train": {"max_steps": 12, "learning_rate": 3e-3, "logging_steps": 1},
        "rollout": {"batch_size": 16, "max_new_tokens": 12},
    }
    for key, value in keys.items():
        stage[key] = {**stage[key], **value} if isinstance(value, dict) and key in stage else value
    return stage


def _final(stage_dir) -> dict:
    return next(r for r in _rows(stage_dir) if r.get("final"))


def test_offline_distillation_pulls_the_student_to_its_teacher(tmp_path, random_student):
    raw = make_recipe([_distill(loss={"nll_alpha": 0.1})], tmp_path / "run", model=str(random_student))
    out = _run(raw)["distill"]
    assert out.kind == "full" and (tmp_path / "run" / "distill" / "model" / "model.safetensors").exists()
    final, rows = _final(tmp_path / "run" / "distill"), steps(tmp_path / "run" / "distill")
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(r["on_policy"] == 0 for r in rows)
    # held-out rows, the same before and after: the KL per token falls by more than half
    assert final["eval_forward_kl"] < 0.5 * final["first_eval_forward_kl"], final
    assert rows[-1]["forward_kl"] < 0.5 * rows[0]["forward_kl"]
    for r in rows:  # loss = forward KL (temperature 1) + 0.1 x the student's NLL of the data's completions
        assert r["loss"] == pytest.approx(r["forward_kl"] + 0.1 * r["nll"], rel=1e-5)


def test_on_policy_steps_follow_the_seeded_draw_and_learn(tmp_path, random_student):
    from alignlab.rl.distill import DistillTrainer

    stage = _distill(mode="on_policy", on_policy_share=0.5, loss={"name": "jsd", "beta": 0.9})
    raw = make_recipe([stage], tmp_path / "run", model=str(random_student))
    _run(raw)
    final, rows = _final(tmp_path / "run" / "distill"), steps(tmp_path / "run" / "distill")
    trainer = DistillTrainer.__new__(DistillTrainer)  # the draw alone: (seed, step) -> on-policy or not
    trainer.spec, trainer.seed = parse_recipe(raw).stages[0], 0
    expected = [float(trainer.on_policy(step)) for step in range(12)]
    assert [r["on_policy"] for r in rows] == expected and 0 < sum(expected) < 12
    sampled = [r for r in rows if r["on_policy"]]
    assert all("teacher_nll" in r and "nll" not in r for r in sampled)
    assert all("nll" in r and "teacher_nll" not in r for r in rows if not r["on_policy"])
    # the teacher finds the student's later samples likelier, and the held-out KL falls
    assert sampled[-1]["teacher_nll"] < sampled[0]["teacher_nll"]
    assert final["eval_forward_kl"] < 0.7 * final["first_eval_forward_kl"], final


def _mismatched_tokenizer(tiny_model_path, folder):
    """The tiny model with two tokens' ids swapped in its tokenizer: the same texts, other ids."""
    shutil.copytree(tiny_model_path, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (100, 101))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def test_a_teacher_with_another_tokenizer_is_refused_before_any_model_loads(
    tmp_path, tiny_model_path, monkeypatch, write_recipe
):
    from alignlab import models
    from alignlab.validate import validate_recipe

    teacher = _mismatched_tokenizer(tiny_model_path, tmp_path / "other-teacher")
    raw = make_recipe([_distill(teacher=str(teacher))], tmp_path / "run")
    with pytest.raises(RecipeError) as err:
        validate_recipe(write_recipe(raw))
    message = str(err.value)
    assert f"teacher '{teacher}' does not share the student's tokenizer: 2 of the student's " in message
    assert ": 100 for the student, 101 for the teacher" in message  # the first token that moved, named
    assert "scores the student's token ids position by position" in message

    # the stage itself checks too (a hub teacher, or a builtin not yet fetched, is only seen there)
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_causal_lm", no_model)
    monkeypatch.setattr("alignlab.stages.distill.load_causal_lm", no_model)
    monkeypatch.setattr("alignlab.stages.rl_glue.load_stage_model", no_model)
    with pytest.raises(RecipeError, match="does not share the student's tokenizer"):
        _run(raw)


def test_offline_steps_need_completions(tmp_path, monkeypatch):
    monkeypatch.setattr("alignlab.stages.rl_glue.load_stage_model", lambda *a, **k: pytest.fail("a model loaded"))
    prompts = {"path": "builtin:arith", "split": "sft", "size": 32, "format": "prompt"}
    for stage in (_distill(dataset=prompts), _distill(dataset=prompts, mode="on_policy", on_policy_share=0.5)):
        with pytest.raises(DataError, match="trains on the data's completions, and these rows are prompts alone"):
            _run(make_recipe([stage], tmp_path / stage.get("mode", "offline")))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"loss": {"name": "reverse_kl", "beta": 0.5}}, "loss.beta weighs the teacher's side of the generalized JSD"),
        ({"loss": {"name": "jsd", "beta": 1.0}}, "less than 1"),
        ({"on_policy_share": 0.5}, "mode offline takes none"),
        ({"teacher": "distill"}, "is this stage itself"),
        ({"teacher": "later"}, "which comes later in the recipe"),
    ],
)
def test_recipe_errors(tmp_path, keys, message):
    later = {"name": "later", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"}}
    with pytest.raises((RecipeError, ValueError), match=message):
        from alignlab.stages.registry import check_chain

        check_chain(parse_recipe(make_recipe([_distill(**keys), later], tmp_path)))


# ---------------------------------------------------------------------------------------------- slow tier


@pytest.mark.slow
def test_lora_student_learns_from_an_earlier_stage(tmp_path, sft_lora_run):
    """The shared LoRA SFT stage teaches a fresh adapter on the base (on-policy, reverse KL by default)."""
    run_dir = copy_run(sft_lora_run, tmp_path / "run")
    stage = _distill(teacher="sft", input="base", mode="on_policy", train={"max_steps": 16})
    outputs = _run(sft_lora_recipe(run_dir, stage))
    assert_reused(sft_lora_run, run_dir)
    out = outputs["distill"]
    assert out.kind == "adapter" and out.base == outputs["sft"].base
    final, rows = _final(run_dir / "distill"), steps(run_dir / "distill")
    assert all(r["on_policy"] == 1 for r in rows) and rows[0]["loss"] == pytest.approx(rows[0]["reverse_kl"])
    assert final["eval_forward_kl"] < 0.5 * final["first_eval_forward_kl"], final
    assert rows[-1]["teacher_nll"] < rows[0]["teacher_nll"]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, random_student):
    from safetensors.torch import load_file

    from alignlab.rl.distill import DistillTrainer

    def recipe(name):  # mixed steps, two minibatches per epoch, two epochs: the draws and shuffles must resume too
        stage = _distill(
            mode="on_policy", on_policy_share=0.5,
            train={"max_steps": 4, "save_steps": 2, "epochs": 2, "minibatch_size": 8, "layer_lr_decay": 0.8},
        )  # fmt: skip
        return make_recipe([stage], tmp_path / name, model=str(random_student))

    _run(recipe("straight"))
    real_step = DistillTrainer.train_step

    def crashing_step(self):  # cut off during step 3, after the step-2 checkpoint
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(DistillTrainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(recipe("resumed"))
    monkeypatch.setattr(DistillTrainer, "train_step", real_step)
    _run(recipe("resumed"), resume=True)

    straight, resumed = _rows(tmp_path / "straight" / "distill"), _rows(tmp_path / "resumed" / "distill")
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == [1, 2, 3, 4, 4]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for key in a:
            if key != "train_runtime" and not key.endswith("step_time"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    a, b = (load_file(str(tmp_path / n / "distill" / "model" / "model.safetensors")) for n in ("straight", "resumed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the layer-wise rates came back with the optimizer state: the step-2 checkpoint's groups, 0.8 apart
    groups = torch.load(tmp_path / "resumed" / "distill" / "checkpoints" / "step-2" / "optimizer.pt")["param_groups"]
    assert sorted({g["layer"] for g in groups}) == list(range(6))
    for g in groups:
        assert g["lr"] == pytest.approx(3e-3 * 0.8 ** (5 - g["layer"]))


def test_a_teacher_folder_is_part_of_the_stage_fingerprint(tmp_path, tiny_model_path):
    """A teacher named by path: its folder's content decides the result, so it is in the fingerprint (a changed
    teacher makes the finished stage stale); a teacher that is an earlier stage is recorded as that stage."""
    from alignlab.fingerprint import stage_parts

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_path, teacher)
    recipe = parse_recipe(make_recipe([_distill(teacher=str(teacher))], tmp_path / "run"))
    before = stage_parts(recipe, recipe.stages[0], {"input": None})
    assert before["teacher"] == str(teacher) and before["teacher.content"].startswith("sha256:")
    (teacher / "generation_config.json").write_text("{}")
    after = stage_parts(recipe, recipe.stages[0], {"input": None})
    assert after["teacher.content"] != before["teacher.content"]
    staged = parse_recipe(make_recipe([{**_distill(teacher="sft"), "name": "d"}], tmp_path / "run2"))
    parts = stage_parts(staged, staged.stages[0], {"input": None, "teacher": ("sft", None)})
    assert parts["teacher"]["stage"] == "sft" and "teacher.content" not in parts
