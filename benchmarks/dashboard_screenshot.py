"""docs/dashboard.svg: the dashboard replaying a real run directory, saved as Textual's SVG export.

    lowmem-tune run profiles/demo.yaml --headless        # or any finished run
    python benchmarks/dashboard_screenshot.py runs/demo docs/dashboard.svg

Replays RUN_DIR/events.jsonl in `MonitorApp` at 160 x 48 cells (Textual's headless driver) and
saves the screen once the whole history is shown.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from lowmem_tune.tui import MonitorApp, RunDirFeed


async def screenshot(run_dir: Path, out: Path, size: tuple[int, int]) -> None:
    app = MonitorApp(RunDirFeed.open(run_dir))
    async with app.run_test(size=size) as pilot:
        while app.state.finished is None:
            await pilot.pause(0.1)
        await pilot.pause(0.5)  # the tick that read the last event has asked for a redraw: let it land
        app.save_screenshot(out.name, str(out.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=48)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(screenshot(args.run_dir, args.out, (args.width, args.height)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
