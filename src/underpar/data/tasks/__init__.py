"""Task datasets for fine-tuning and answer-scored evaluation: each task loads examples (hub,
local file, or generated offline), formats the prompt, scores answers by its answer kind
(`underpar.data.answers`), and gives the SFT target text. Tasks are registered by name in
`TASKS`; SFT tokenization and batching live in `underpar.data.sft`."""

from underpar.data.tasks.base import TASKS, Example, Task, get_task, hub_records, read_records, register_task
from underpar.data.tasks import hub  # noqa: F401, I001  (registers the tasks: hub ones first, as listed)
from underpar.data.tasks import generated  # noqa: F401
from underpar.data.tasks.generated import Generated

__all__ = ["TASKS", "Example", "Generated", "Task", "get_task", "hub_records", "read_records", "register_task"]
