"""`alignlab export`: a finished run's model as a folder people can use (merged HF weights or the adapter, the
tokenizer and chat template, the end tokens alignlab stops on, a model card, optionally a GGUF file), then
optionally uploaded to the hub. command.py drives it; card.py writes the card from the run's records;
gguf_writer.py writes the GGUF file; hub.py checks and uploads."""


class ExportError(ValueError):
    """An export that cannot be done as asked (no such stage, a stage that wrote no model, an unfinished run, a
    model the GGUF writer does not cover, no hub token); the message names the stage or option and the fix. The CLI
    prints it as one error, and nothing is left at --to."""
