"""``Background``: a part that runs one asyncio task of its own (``_run``) between ``start()``
and ``close()``."""

from __future__ import annotations

import asyncio
import contextlib


class Background:
    """``start()`` runs ``self._run()`` as a task named ``task_name`` (once); ``close()`` cancels
    it and waits for it to finish. Subclasses implement ``_run``."""

    task_name = "background"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        raise NotImplementedError
