"""How often the dashboard may redraw without slowing the training it shows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RedrawPacer:
    """Spaces redraws so that the UI thread's own CPU time stays within `budget` of wall time.

    The UI shares the interpreter lock with the training thread: on a small model whose step is
    mostly Python, each millisecond the UI spends is a millisecond training waits. Drawing costs
    what the terminal's size and the chart make it (tens of milliseconds a pass in a large
    terminal), so a fixed rate cannot promise anything; measuring what the last interval cost
    and spacing the next pass to fit the budget can. Redraws never come more often than
    `fastest_s` nor less often than `slowest_s` apart.
    """

    budget: float = 0.01
    fastest_s: float = 1.0
    slowest_s: float = 5.0

    def next_interval(self, cpu_s: float, wall_s: float) -> float:
        """The wait before the next redraw, given the UI thread's CPU seconds over the last
        `wall_s` seconds (its redraw included)."""
        if wall_s <= 0:
            return self.fastest_s
        return min(max(cpu_s / self.budget, self.fastest_s), self.slowest_s)
