"""Built-ins: a tiny base model built here (`builtin:tiny-llama`), a real pretrained model fetched from PyPI on first
use (`builtin:smollm2-135m-instruct`, alignlab/builtin/pretrained.py), and synthetic tasks with exact rewards."""

from alignlab.builtin.models import builtin_model_names, builtin_model_path, resolve_model_name
from alignlab.builtin.tasks import BUILTIN_TASKS, Task, arith_reward, flipped_indices, generate_task, write_task
from alignlab.builtin.tiny_model import BUILTIN_MODELS

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TASKS",
    "Task",
    "arith_reward",
    "builtin_model_names",
    "builtin_model_path",
    "flipped_indices",
    "generate_task",
    "resolve_model_name",
    "write_task",
]
