"""alignlab: recipe-driven alignment and PEFT for language models."""

__version__ = "0.1.0"
