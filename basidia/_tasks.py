"""The running task, read without ``asyncio.current_task``'s Python frame.

On CPython 3.11 ``asyncio.current_task`` is a Python function around a dict lookup
and costs more than a frame's decoding; the per-call path (the request server, the
memory broker's hand-off, docs/benchmarks.md) reads that dict directly.  Where the
dict is not there (other interpreters, later Pythons), the public function is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = ["current_task_getter"]

_c_module: Any
try:
    import _asyncio as _c_module
except ImportError:  # pragma: no cover - an interpreter without asyncio's C module
    _c_module = None
# The dict that asyncio's C ``_enter_task`` updates (CPython 3.11 to 3.13; later versions
# keep the current task elsewhere, and a dict of the same name that stays empty).
_current_tasks: Any = getattr(_c_module, "_current_tasks", None)
if _current_tasks is not getattr(asyncio.tasks, "_current_tasks", None):
    _current_tasks = None


def current_task_getter(
    loop: asyncio.AbstractEventLoop,
) -> Callable[[], asyncio.Task[Any] | None]:
    """A function returning the task running on ``loop`` (None outside any task)."""
    if type(_current_tasks) is dict:
        return partial(_current_tasks.get, loop)
    return partial(asyncio.current_task, loop)
