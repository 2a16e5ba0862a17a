"""The demo's live display: one line per job, redrawn in place on a terminal, or plain lines
elsewhere. Everything it shows comes from the runtime's in-memory views."""

from __future__ import annotations

import shutil
from typing import TextIO

import msgspec

from .spec import JobSpec
from .views import CheckpointInfo, JobStatus, JobView

__all__ = ["Display", "Row", "job_row", "number_cell"]


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One job's line: what the display shows, taken from the runtime's in-memory view."""

    job_id: str
    seed: int
    lr: float
    status: JobStatus
    iteration: int
    total: int
    reward: float | None
    success: float | None
    held_out: float | None  # at the latest checkpoint, or the final score
    held_out_at: int | None
    best: int | None
    resumed_from: int | None


def job_row(view: JobView, spec: JobSpec, checkpoints: list[CheckpointInfo],
         resumed_from: int | None) -> Row:
    latest = max(checkpoints, key=lambda c: c.iteration, default=None)
    held_out, held_out_at = ((latest.validation_score, latest.iteration) if latest
                             else (None, None))
    if view.status is JobStatus.COMPLETED and view.validation_score is not None:
        held_out, held_out_at = view.validation_score, view.progress.current_iteration
    return Row(job_id=view.job_id, seed=spec.config.seed, lr=spec.config.learning_rate,
               status=view.status, iteration=view.progress.current_iteration,
               total=view.progress.total_iterations, reward=view.metrics.get("avg_reward"),
               success=view.metrics.get("success_rate"), held_out=held_out,
               held_out_at=held_out_at, best=view.best_checkpoint, resumed_from=resumed_from)


def number_cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else " " * (width - 1) + "-"


class Display:
    """Redraws one line per job in place on a terminal (ANSI cursor-up), or, elsewhere,
    prints a plain line per checkpoint and per status change."""

    HEADER = (f"  {'job':<8} {'seed':>4} {'lr':>5}  {'status':<9} {'progress':<14} "
              f"{'reward':>6} {'success':>7}  {'held-out':<9} {'best':>4}")
    LEGEND = ("reward (the scale above), success (0..1): this iteration's rollouts; held-out: "
              "greedy success on\nunseen queries at the latest checkpoint (@ its iteration); "
              "best: the best checkpoint.")

    def __init__(self, out: TextIO, *, live: bool) -> None:
        self.out = out
        self.live = live
        self.drawn = 0
        self.bar = ("█", "░") if (getattr(out, "encoding", "") or "").lower().startswith(
            "utf") else ("#", "-")
        self.printed: dict[str, tuple[JobStatus, int]] = {}

    def start(self, rows: list[Row], resumed: dict[str, int]) -> None:
        """Remember where each job starts, so plain lines only tell what happens now."""
        for row in rows:
            self.printed[row.job_id] = (row.status if row.status.is_terminal else JobStatus.QUEUED,
                                        resumed.get(row.job_id, 0))
        if self.live:
            self._echo(self.LEGEND + "\n")
            self.out.write("\x1b[?25l")  # hide the cursor while redrawing
            self._echo(self.HEADER[:self._width()])

    def update(self, rows: list[Row], checkpoints: dict[str, list[CheckpointInfo]]) -> None:
        if self.live:
            self._redraw(rows)
        else:
            self._plain(rows, checkpoints)
        self.out.flush()

    def finish(self) -> None:
        if self.live:
            self.out.write("\x1b[?25h")
            self.out.flush()

    def _echo(self, line: str) -> None:
        self.out.write(line + "\n")

    def _redraw(self, rows: list[Row]) -> None:
        width = self._width()
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        for row in rows:
            self.out.write("\x1b[2K" + self.line(row)[:width] + "\n")
        self.drawn = len(rows)

    @staticmethod
    def _width() -> int:
        """Columns a line may use: a wrapped line would break the cursor-up redraw."""
        return max(20, shutil.get_terminal_size((100, 24)).columns - 1)

    def line(self, row: Row) -> str:
        """One job's live line."""
        filled = round(8 * row.iteration / row.total) if row.total else 0
        bar = self.bar[0] * filled + self.bar[1] * (8 - filled)
        progress = f"{bar} {row.iteration:>{len(str(row.total))}}/{row.total}"
        held = (f"{row.held_out:.2f} @{row.held_out_at}" if row.held_out is not None else "-")
        note = f"  resumed from {row.resumed_from}" if row.resumed_from is not None else ""
        return (f"  {row.job_id:<8} {row.seed:>4} {row.lr:>5g}  {row.status.value:<9} "
                f"{progress:<14} {number_cell(row.reward, 6)} {number_cell(row.success, 7)}  {held:<9} "
                f"{row.best if row.best is not None else '-':>4}{note}")

    def _plain(self, rows: list[Row], checkpoints: dict[str, list[CheckpointInfo]]) -> None:
        for row in rows:
            status, last = self.printed.get(row.job_id, (JobStatus.QUEUED, 0))
            for info in sorted(checkpoints.get(row.job_id, ()), key=lambda c: c.iteration):
                if info.iteration > last:
                    m = info.metrics
                    self._echo(f"{row.job_id}  iteration {info.iteration}/{row.total}  "
                               f"reward {number_cell(m.get('avg_reward'), 5).strip()}  "
                               f"success {number_cell(m.get('success_rate'), 4).strip()}  "
                               f"held-out {info.validation_score:.2f}  checkpoint saved")
                    last = info.iteration
            if row.status is not status:
                if row.status is JobStatus.RUNNING and row.resumed_from is not None:
                    self._echo(f"{row.job_id}  running: resumed from checkpoint "
                               f"{row.resumed_from}" if row.resumed_from else
                               f"{row.job_id}  running: restarted (no checkpoint yet)")
                elif row.status is JobStatus.COMPLETED:
                    self._echo(f"{row.job_id}  completed  held-out {number_cell(row.held_out, 4)}")
                else:
                    self._echo(f"{row.job_id}  {row.status.value}")
                status = row.status
            self.printed[row.job_id] = (status, last)
