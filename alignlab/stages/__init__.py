"""Stages: one module per stage type (sft, dpo, reward, ppo, eval), each with `run(ctx: StageContext) ->
StageOutput`, reading top to bottom: build inputs, build trainer, train, save, report. Their records (keys, data
formats, references, ...) are in registry.py and specs.py; a runner module is imported only when its stage runs."""
