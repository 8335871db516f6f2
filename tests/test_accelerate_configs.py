"""The shipped accelerate configs (recipes/accelerate/*.yaml) and `alignlab validate --accelerate-config`.

Each config is read by accelerate's own loader and by `accelerate launch`'s argument handling (without launching),
and a shipped recipe validates with it. Known-bad recipe/launch combinations fail before any model loads, with a
message naming the keys to change; doubtful ones are warnings. Under `accelerate launch`, `alignlab run` reads the
same settings from the environment the launcher gives each process, and refuses the same combinations.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml

from alignlab.accelerate_checks import check_launch, launch_config_from_env, load_launch_config
from alignlab.cli import main
from alignlab.recipe import RecipeError, load_recipe
from alignlab.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "accelerate"
QWEN = ROOT / "recipes" / "examples" / "qwen2.5-0.5b-instruct-sft-dpo-lora.yaml"  # LoRA, bf16
LLAMA = ROOT / "recipes" / "examples" / "llama-3.1-8b-qlora-sft-dpo.yaml"  # QLoRA, bf16, quant_storage bf16
EXPECTED = {
    "ddp.yaml": ("MULTI_GPU", QWEN),
    "fsdp2.yaml": ("FSDP", QWEN),
    "fsdp2_qlora.yaml": ("FSDP", LLAMA),
    "fsdp_qlora.yaml": ("FSDP", LLAMA),
    "zero2.yaml": ("DEEPSPEED", QWEN),
    "zero3.yaml": ("DEEPSPEED", LLAMA),
    "multinode.yaml": ("MULTI_GPU", QWEN),
    "multinode_fsdp2.yaml": ("FSDP", QWEN),
}
NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate_and_launch_accepts_it(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = str(CONFIGS / name)
    kind = EXPECTED[name][0]
    assert load_config_from_file(path).distributed_type.value == kind
    cfg = ClusterConfig.from_yaml_file(path)
    assert cfg.distributed_type.value == kind and cfg.compute_environment.value == "LOCAL_MACHINE"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", path, "-m", "alignlab"]))
    assert (args.use_fsdp, args.use_deepspeed, args.multi_gpu) == (
        kind == "FSDP",
        kind == "DEEPSPEED",
        kind == "MULTI_GPU",
    )
    assert args.mixed_precision == "bf16"
    if name.startswith("multinode"):
        assert (cfg.num_machines, cfg.machine_rank, cfg.main_process_ip) == (2, 0, "10.0.0.1")
    if kind == "FSDP":  # FSDP1: FULL_SHARD; FSDP2 says the same with reshard_after_forward
        if cfg.fsdp_config["fsdp_version"] == 2:
            assert cfg.fsdp_config["fsdp_reshard_after_forward"] is True
        else:
            assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_version"] == (1 if name == "fsdp_qlora.yaml" else 2)
    if name == "fsdp_qlora.yaml":  # PEFT's FSDP-QLoRA settings
        assert cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
        assert cfg.fsdp_config["fsdp_use_orig_params"] is False
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[4])
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config  # taken from the recipe


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_recipe_validates_with_config(name, capsys):
    recipe, notes = validate_recipe(EXPECTED[name][1], accelerate_config=CONFIGS / name)
    warnings = [n for n in notes if n.startswith("warning:")]
    expected = ["warning: deepspeed is not installed here"] if name.startswith("zero") and NO_DEEPSPEED else []
    assert [w[: len(e)] for w, e in zip(warnings, expected)] == expected and len(warnings) == len(expected)
    assert main(["validate", str(EXPECTED[name][1]), "--accelerate-config", str(CONFIGS / name)]) == 0
    assert "valid (2 stages: sft -> dpo)" in capsys.readouterr().out


def _error(recipe_path, config, overrides=()) -> str:
    with pytest.raises(RecipeError) as exc:
        validate_recipe(recipe_path, list(overrides), accelerate_config=config)
    return str(exc.value)


def _config(tmp_path, base: str, **changes) -> Path:
    raw = yaml.safe_load((CONFIGS / base).read_text())
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section][sub] = value
        else:
            raw[key] = value
    path = tmp_path / f"custom-{base}"
    path.write_text(yaml.safe_dump(raw))
    return path


QLORA_TINY = ROOT / "recipes" / "sft_dpo_qlora.yaml"  # QLoRA with the default uint8 storage, float32 model


@pytest.mark.parametrize("config", ["fsdp_qlora.yaml", "fsdp2_qlora.yaml", "zero3.yaml"])
def test_qlora_sharded_needs_float_storage_equal_to_model_dtype(config):
    msg = _error(QLORA_TINY, CONFIGS / config)
    assert f"recipes/sft_dpo_qlora.yaml cannot run with {CONFIGS / config}:" in msg
    assert "peft.quantization.quant_storage is uint8" in msg and "shards floating-point tensors only" in msg
    assert "Set quant_storage: float32 and model.dtype: float32" in msg
    msg = _error(QLORA_TINY, CONFIGS / config, ["peft.quantization.quant_storage=bfloat16"])
    assert "model.dtype is float32 but peft.quantization.quant_storage is bfloat16" in msg
    assert "set model.dtype: bfloat16" in msg
    msg = _error(LLAMA, CONFIGS / config, ["peft.quantization.bits=8"])
    assert "peft.quantization.bits: 8 cannot be sharded" in msg and "use bits: 4" in msg


def test_qlora_under_ddp_and_zero2_needs_nothing_more():
    for config in ("ddp.yaml", "zero2.yaml"):
        validate_recipe(QLORA_TINY, ["stages.sft.train.bf16=true", "stages.dpo.train.bf16=true"], CONFIGS / config)


def test_fsdp_qlora_settings_from_peft_guide_are_warned(tmp_path):
    config = _config(
        tmp_path,
        "fsdp_qlora.yaml",
        fsdp_config__fsdp_use_orig_params=True,
        fsdp_config__fsdp_cpu_ram_efficient_loading=False,
    )
    _, notes = validate_recipe(LLAMA, accelerate_config=config)
    assert "warning: QLoRA under FSDP: set fsdp_cpu_ram_efficient_loading: true (PEFT's FSDP-QLoRA guide)" in notes
    assert "warning: QLoRA under FSDP: PEFT's FSDP-QLoRA guide sets fsdp_use_orig_params: false" in notes


@pytest.mark.parametrize("config", ["fsdp2.yaml", "fsdp_qlora.yaml", "zero3.yaml"])
def test_wdpo_double_backprop_is_refused_with_sharded_parameters(config):
    msg = _error(QWEN, CONFIGS / config, ["stages.dpo.loss.name=wdpo"])
    assert "stages[1] (dpo).loss.name: wdpo differentiates its loss twice" in msg
    assert "Use ddp.yaml or zero2.yaml, or another loss" in msg
    validate_recipe(QWEN, ["stages.dpo.loss.name=wdpo"], CONFIGS / "ddp.yaml")  # DDP: fine


@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_own_loops_run_under_ddp_or_fsdp_not_deepspeed(config):
    """ppo, grpo and generate shard their models themselves (FSDP2) and prepare no dataloader for DeepSpeed."""
    recipe = ROOT / "recipes" / "sft_ppo_reward_fn.yaml"
    msg = _error(recipe, CONFIGS / config)
    assert "stages[1] (ppo): the ppo stage runs alignlab's own loop, which shards its models itself" in msg
    assert "runs under DDP (ddp.yaml, multinode.yaml) or FSDP (fsdp2.yaml)" in msg
    for ok in ("ddp.yaml", "fsdp2.yaml", "multinode_fsdp2.yaml"):
        validate_recipe(recipe, accelerate_config=CONFIGS / ok)
    generate = ROOT / "recipes" / "smollm2_generate_dpo_lora.yaml"
    assert "the generate stage samples with alignlab's own loop" in _error(generate, CONFIGS / config)


def test_slurm_template_launches_a_checked_multinode_config():
    """recipes/slurm/alignlab.sbatch: valid bash, one `accelerate launch` per node with the multi-node FSDP2 config
    and the machine keys from the allocation, after `alignlab validate --accelerate-config` of the same config."""
    import subprocess

    script = ROOT / "recipes" / "slurm" / "alignlab.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "CONFIG=${ACCELERATE_CONFIG:-recipes/accelerate/multinode_fsdp2.yaml}" in text
    assert text.index('alignlab validate "$RECIPE" --accelerate-config "$CONFIG"') < text.index("srun --")
    for key in ("--num_machines $NODES", "--machine_rank \\$SLURM_NODEID", "--main_process_ip $MAIN"):
        assert key in text, key
    assert load_launch_config(CONFIGS / "multinode_fsdp2.yaml")["distributed_type"] == "FSDP"


def test_deepspeed_values_must_equal_the_recipes(tmp_path):
    config = _config(tmp_path, "zero2.yaml", deepspeed_config__gradient_accumulation_steps=4)
    msg = _error(QWEN, config)  # the recipe's sft stage accumulates 4 steps, its dpo stage 8
    assert (
        "deepspeed_config.gradient_accumulation_steps is 4 but stages[1] (dpo).train.gradient_accumulation_steps is 8"
        in msg
    )
    assert "stages[0]" not in msg and "Remove gradient_accumulation_steps from the accelerate config" in msg
    config = _config(tmp_path, "zero2.yaml", deepspeed_config__gradient_clipping=0.5)
    assert "deepspeed_config.gradient_clipping is 0.5 but stages[0] (sft).train.max_grad_norm is 1" in _error(
        QWEN, config
    )


def test_zero3_must_gather_16bit_weights_to_save(tmp_path):
    config = _config(tmp_path, "zero3.yaml", deepspeed_config__zero3_save_16bit_model=False)
    assert "ZeRO-3 needs zero3_save_16bit_model: true" in _error(QWEN, config)


def test_multinode_needs_the_main_address(tmp_path):
    config = _config(tmp_path, "multinode.yaml", main_process_ip=None)
    assert "num_machines > 1 needs main_process_ip: the address of the machine with machine_rank 0" in _error(
        QWEN, config
    )


def test_unsupported_backend_and_unreadable_configs(tmp_path):
    config = _config(tmp_path, "ddp.yaml", distributed_type="XLA")
    assert "distributed_type XLA (TPUs) is not supported" in _error(QWEN, config)
    config = _config(tmp_path, "ddp.yaml", num_procs=2)
    msg = _error(QWEN, config)
    assert f"accelerate config {config}: accelerate cannot read it" in msg and "num_procs" in msg
    assert f"accelerate config not found: {tmp_path / 'nope.yaml'}" in _error(QWEN, tmp_path / "nope.yaml")


def test_mixed_precision_mismatch_is_a_warning(capsys):
    recipe = ROOT / "recipes" / "quickstart.yaml"  # float32 training on the tiny model
    _, notes = validate_recipe(recipe, accelerate_config=CONFIGS / "ddp.yaml")
    assert (
        "warning: mixed precision: the accelerate config says bf16, stages[0] (sft).train says no (bf16/fp16 keys); "
        "this stage trains in bf16. Make them agree" in notes
    )
    assert main(["validate", str(recipe), "--accelerate-config", str(CONFIGS / "ddp.yaml")]) == 0
    assert "  warning: mixed precision: the accelerate config says bf16, stages[1] (dpo)" in capsys.readouterr().out


def _launch_env(name: str) -> dict:
    """The environment `accelerate launch --config_file NAME` gives each process (built, not launched)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "alignlab"])
    args, defaults, _ = _validate_launch_command(parsed)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return {**prepare_deepspeed_cmd_env(args)[1], "WORLD_SIZE": str(args.num_processes)}
    return {**prepare_multi_gpu_env(args), "WORLD_SIZE": str(args.num_processes)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_environment_gives_the_same_settings_as_the_file(name):
    env, file = launch_config_from_env(_launch_env(name)), load_launch_config(CONFIGS / name)
    assert (env["distributed_type"], env["mixed_precision"]) == (file["distributed_type"], file["mixed_precision"])
    recipe = load_recipe(EXPECTED[name][1])
    assert check_launch(recipe, env) == check_launch(recipe, file)


def test_run_under_launch_refuses_a_bad_combination_before_loading(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline started")

    monkeypatch.setattr("alignlab.pipeline.run_pipeline", refuse)
    for key, value in _launch_env("fsdp2.yaml").items():
        monkeypatch.setenv(key, value)
    raw = yaml.safe_load((ROOT / "recipes" / "robust_dpo_noisy.yaml").read_text())
    raw["output_dir"] = str(tmp_path / "run")
    raw["stages"][1]["loss"] = {"name": "wdpo", "beta": 0.1, "rho": 0.01}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "r.yaml cannot run with the accelerate launch settings:" in err and "wdpo differentiates its loss twice" in err
    )
    assert not (tmp_path / "run").exists()
