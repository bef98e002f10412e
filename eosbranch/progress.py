"""The progress bar on stderr: step, loss, last sharpness, ETA."""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, start: int):
    """Yields the loop's per-step callback ``(trainer, loss)``; a no-op when not ``enabled``."""
    if not enabled:
        yield lambda tr, loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4g}  sharpness {task.fields[sharp]}"), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"), sharp="-")
        last = [0.0]

        def on_step(tr, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] > 0.1 or tr.st.step == total:  # keep the hot loop cheap
                s = tr.st.measured.get("sharpness")
                bar.update(task, completed=tr.st.step, loss=loss, sharp="-" if s is None else f"{s:.4g}")
                last[0] = now

        yield on_step
