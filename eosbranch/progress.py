"""The progress bar on stderr: step, loss, last sharpness, ETA. The loss shown is the last one the
trainer has settled (each step's on the CPU; on an accelerator, as of the last measurement or
checkpoint: reading it every step would make each step wait for the device)."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, start: int):
    """Yields the loop's per-step callback ``(trainer, losses)``; a no-op when not ``enabled``."""
    if not enabled:
        yield lambda tr, losses: None
        return

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4g}  sharpness {task.fields[sharp]}"), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"), sharp="-")
        last, loss = [0.0], [float("nan")]

        def on_step(tr, losses: list) -> None:
            if losses:
                loss[0] = losses[-1][1]
            now = time.monotonic()
            if now - last[0] > 0.1 or tr.st.step == total:  # keep the hot loop cheap
                s = tr.st.measured.get("sharpness")
                bar.update(task, completed=tr.st.step, loss=loss[0], sharp="-" if s is None else f"{s:.4g}")
                last[0] = now

        yield on_step
