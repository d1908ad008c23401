"""The live view of a running cohort (rich): studies per step, done, failed, refused, rate and time
left, redrawn in place on a terminal; without one, a line whenever the counts change."""

from __future__ import annotations

import sys

from omi_dsf.client.progress import STEPS


def _eta(seconds: int | None) -> str:
    if seconds is None:
        return "–"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def line(v: dict) -> str:
    steps = " ".join(f"{k}={v['steps'].get(k, 0)}" for k in ("submitting", "submitted", *STEPS) if v["steps"].get(k))
    return (f"{v['completed'] + v['failed'] + v['refused']}/{v['studies']} done: {v['completed']} completed, "
            f"{v['failed']} failed, {v['refused']} refused; in flight {v['in_flight']}"
            + (f" ({steps})" if steps else "") + f"; {v['per_minute']:g}/min, left {_eta(v['eta_s'])}")


class CohortView:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self._live = None
        self._last = None

    def __enter__(self) -> "CohortView":
        if self.tty:
            from rich.live import Live

            self._live = Live(refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def update(self, v: dict) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._render(v))
            return
        text = line(v)
        if text.split("; ")[:2] != (self._last or "").split("; ")[:2]:   # counts changed, not only the rate
            print(text, flush=True)
        self._last = text

    @staticmethod
    def _render(v: dict):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        done = v["completed"] + v["failed"] + v["refused"]
        table = Table(box=None, show_header=True, header_style="bold")
        for col in ("waiting", *STEPS, "completed", "failed", "refused", "per min", "left"):
            table.add_column(col, justify="right")
        table.add_row(str(v["pending"] + v["steps"].get("submitting", 0) + v["steps"].get("submitted", 0)
                          + v["steps"].get("starting", 0)),
                      *(str(v["steps"].get(s, 0)) for s in STEPS), str(v["completed"]),
                      f"[red]{v['failed']}[/]" if v["failed"] else "0", str(v["refused"]),
                      f"{v['per_minute']:g}", _eta(v["eta_s"]))
        return Group(f"cohort {v['record']}: {done}/{v['studies']} studies done",
                     ProgressBar(total=max(v["studies"], 1), completed=done, width=60), table)
