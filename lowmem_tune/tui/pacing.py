"""How often the dashboard may redraw without slowing the training it shows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RedrawPacer:
    """Spaces redraws so that the UI thread's own CPU time stays within `budget` of wall time.

    The UI shares the interpreter lock with the training thread: on a small model whose step is
    mostly Python, each millisecond the UI spends is a millisecond training waits. A redraw costs
    what the terminal's size, the chart and the machine make it (about 10 ms for 200 x 50 cells
    on a 2-core CPU), so a fixed rate cannot promise anything; measuring what the last interval
    cost and spacing the next redraw to fit the budget can. Redraws never come more often than
    `fastest_s` nor less often than `slowest_s` apart.
    """

    budget: float = 0.01
    fastest_s: float = 1.0
    slowest_s: float = 5.0

    def next_interval(self, cpu_s: float) -> float:
        """The wait before the next redraw, given the CPU seconds the UI thread spent since the
        last one (that redraw included): spent again over the wait, they are `budget` of it."""
        return min(max(cpu_s / self.budget, self.fastest_s), self.slowest_s)
