"""The dashboard driven through Textual's Pilot with scripted event streams and a recorded run dir."""

from __future__ import annotations

import asyncio
import time

import pytest

from lowmem_tune.errors import UserError
from lowmem_tune.hardware import GpuStats
from lowmem_tune.events import (
    CheckpointSaved,
    EvalLoss,
    EvalResult,
    Info,
    RunFinished,
    RunStarted,
    StepMetrics,
    event_to_json,
)
from lowmem_tune.train.control import RunControl
from lowmem_tune.tui import DashboardApp, MonitorApp, QueueFeed, RunDirFeed, monitor_command
from lowmem_tune.profile import Profile
from lowmem_tune.tui.live import LiveRun
from lowmem_tune.tui.pacing import RedrawPacer
from lowmem_tune.tui.state import RunState, Series
from lowmem_tune.tui.widgets import HeaderBar, LossChart, MemoryPanel, StrategyPanel

NUM_LAYERS = 8
TOTAL_STEPS = 20
GIB = 1024**3


def started() -> RunStarted:
    return RunStarted(run_dir="runs/test", model="tiny-llama", strategy="owlore", device="cpu", gpu_name=None,
                      total_steps=TOTAL_STEPS, start_step=0, num_layers=NUM_LAYERS, planned_peak_bytes=2 * GIB,
                      dtype="bfloat16", strategy_info={"name": "owlore", "sampled_layers": 2, "interval": 5,
                                     "layers": [{"layer": i, "probability": p} for i, p in
                                                enumerate([0.05, 0.3, 0.1, 0.1, 0.05, 0.2, 0.1, 0.1])]})


def step(n: int, active: list[int]) -> StepMetrics:
    return StepMetrics({"step": n, "total_steps": TOTAL_STEPS, "epoch": n / 40, "loss": 3.0 - 0.1 * n,
                        "lr": 1e-4, "grad_norm": 0.5, "tokens": 512 * n, "tokens_per_s": 1000.0 + 10 * n,
                        "elapsed_s": 2.0 * n, "eta_s": 2.0 * (TOTAL_STEPS - n), "rss": GIB + n * 1024**2,
                        "active_layers": active})


def text_of(widget) -> str:
    if isinstance(widget, LossChart):
        return "\n".join(strip.text for strip in widget.lines())
    return str(widget.content)


def log_text(app) -> str:
    """The event log's text without whitespace, so that wrapping at the panel's width does not matter."""
    return "".join("".join(str(line.text) for line in app.query_one("#events").lines).split())


def squeeze(text: str) -> str:
    return "".join(text.split())


async def wait_for(pilot, condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "dashboard did not update in time"
        await pilot.pause(0.05)


def test_dashboard_renders_a_scripted_stream():
    feed = QueueFeed()

    async def scenario() -> None:
        app = DashboardApp(feed, control=RunControl())
        async with app.run_test(size=(160, 48)) as pilot:
            feed.emit(started())
            for n in range(1, 6):
                feed.emit(step(n, active=[1, 5]))
            await wait_for(pilot, lambda: app.state.metrics.get("step") == 5)
            chart_before = text_of(app.query_one(LossChart))
            progress = text_of(app.query_one("#progress-steps"))
            strategy = text_of(app.query_one(StrategyPanel))
            assert "step 5 / 20" in progress
            assert "cpu · bfloat16" in str(app.query_one(HeaderBar).content)  # the precision that runs
            assert "elapsed 0:00:10" in text_of(app.query_one("#progress-times"))
            assert "ETA 0:00:30" in text_of(app.query_one("#progress-times"))
            assert any(0x2800 < ord(c) <= 0x28FF for c in chart_before), "no braille curve drawn"
            assert "3.000" not in chart_before  # the y range is taken from the data: 2.5 .. 2.9
            assert "2.900" in chart_before and "2.500" in chart_before
            # the layer strip: one cell per decoder layer, layers 1 and 5 lit
            strip = next(line for line in strategy.splitlines() if line.startswith("layers "))
            assert strip.split()[1] == "░█░░░█░░"
            assert "sampling probability (max 0.300)" in strategy
            memory = text_of(app.query_one(MemoryPanel))
            assert "RSS   1.00 GiB" in memory
            assert "plan  2.00 GiB peak · measured 50% of it" in memory

            feed.emit(step(6, active=[0, 3]))
            feed.emit(EvalLoss(step=6, eval_loss=2.2))
            feed.emit(CheckpointSaved(step=6, path="runs/test/checkpoint-6", seconds=0.4))
            await wait_for(pilot, lambda: app.state.metrics.get("step") == 6)
            assert "step 6 / 20" in text_of(app.query_one("#progress-steps"))
            strategy = text_of(app.query_one(StrategyPanel))
            assert next(line for line in strategy.splitlines() if line.startswith("layers ")).split()[1] == "█░░█░░░░"
            chart_after = text_of(app.query_one(LossChart))
            assert chart_after != chart_before
            assert "2.200" in chart_after  # the eval point extends the y range
            assert "eval 2.200 @ step 6" in text_of(app.query_one("#loss-summary"))
            assert squeeze("checkpoint step 6 saved") in log_text(app)
            assert squeeze("eval loss 2.200 at step 6") in log_text(app)

    asyncio.run(scenario())


def test_q_requests_a_graceful_stop_and_exits_when_the_run_finishes():
    feed, control = QueueFeed(), RunControl()

    async def scenario() -> None:
        app = DashboardApp(feed, control=control)
        async with app.run_test(size=(120, 40)) as pilot:
            feed.emit(started())
            feed.emit(step(1, active=[2, 3]))
            await wait_for(pilot, lambda: app.state.started is not None)
            await pilot.press("s")
            assert control.take_checkpoint_request()
            await pilot.press("q")
            assert control.stop_requested and not control.abort_requested
            assert app.is_running and app.status == "stopping"
            # the training loop checkpoints and finishes; only then does the dashboard close
            feed.emit(CheckpointSaved(step=2, path="runs/test/checkpoint-2", seconds=0.2))
            feed.emit(RunFinished(status="stopped", step=2))
            await wait_for(pilot, lambda: not app.is_running)
        assert app.state.finished.status == "stopped"
        assert app.state.last_checkpoint.step == 2

    asyncio.run(scenario())


def test_completed_run_stays_on_screen_until_q():
    feed = QueueFeed()

    async def scenario() -> None:
        app = DashboardApp(feed, control=RunControl())
        async with app.run_test(size=(120, 40)) as pilot:
            feed.emit(started())
            feed.emit(step(TOTAL_STEPS, active=[0, 1]))
            feed.emit(EvalResult(stage="final", results={"tasks": {"boolq": {"acc": 0.625, "n": 8}}}))
            feed.emit(RunFinished(status="completed", step=TOTAL_STEPS, final_dir="runs/test/final"))
            feed.close()
            await wait_for(pilot, lambda: app.state.finished is not None)
            await pilot.pause(0.3)
            assert app.is_running and "completed" in text_of(app.query_one("#header"))
            assert squeeze("final eval: boolq acc=0.625 (n=8)") in log_text(app)
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running)

    asyncio.run(scenario())


def test_dashboard_closes_when_the_training_thread_dies_without_finishing():
    feed = QueueFeed()

    async def scenario() -> None:
        app = DashboardApp(feed, control=RunControl())
        async with app.run_test() as pilot:
            feed.emit(started())
            feed.close()
            await wait_for(pilot, lambda: not app.is_running)

    asyncio.run(scenario())


def write_run_dir(run_dir, events) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "events.jsonl").open("a") as handle:
        for event in events:
            handle.write(event_to_json(event) + "\n")


def test_monitor_replays_a_recorded_run_and_follows_new_lines(tmp_path):
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, [started(), Info("loaded tiny-llama")] + [step(n, active=[n % NUM_LAYERS]) for n in range(1, 11)]
                  + [EvalLoss(step=10, eval_loss=2.1)])

    async def scenario() -> None:
        app = MonitorApp(RunDirFeed.open(run_dir))
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for(pilot, lambda: app.state.metrics.get("step") == 10)
            assert len(app.state.train_loss.points) == 10
            assert "step 10 / 20" in text_of(app.query_one("#progress-steps"))
            assert "eval 2.100 @ step 10" in text_of(app.query_one("#loss-summary"))
            # the run goes on in another process: half a line first, then the rest
            line = event_to_json(step(11, active=[3]))
            with (run_dir / "events.jsonl").open("a") as handle:
                handle.write(line[:20])
            await pilot.pause(0.3)
            assert app.state.metrics["step"] == 10
            write_run_dir(run_dir, [])
            with (run_dir / "events.jsonl").open("a") as handle:
                handle.write(line[20:] + "\n")
                handle.write(event_to_json(RunFinished(status="completed", step=11)) + "\n")
            await wait_for(pilot, lambda: app.state.finished is not None)
            assert app.state.metrics["step"] == 11
            assert "completed" in text_of(app.query_one("#header"))
            assert sorted(key for key, active in app.active_bindings.items() if active.binding.show) == ["q", "question_mark"]
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running)

    asyncio.run(scenario())


def test_monitor_refuses_a_missing_or_empty_run_dir(tmp_path):
    with pytest.raises(UserError, match="run directory not found"):
        monitor_command(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no events"):
        monitor_command(tmp_path / "empty")


def test_series_keeps_a_bounded_history_and_forgets_steps_a_resume_repeats():
    series = Series(max_points=8)
    for n in range(1, 21):
        series.add(n, float(n))
    assert len(series.points) <= 8
    steps = [step for step, _ in series.points]
    assert steps == sorted(steps) and steps[0] <= 5 and series.points[-1] == (20, 20.0)  # still spans the run
    # a merged point is the mean of its neighbours: with value == step here, it stays on the diagonal
    assert all(value == pytest.approx(step) for step, value in series.points)
    series.drop_after(10)
    assert max(step for step, _ in series.points) <= 10


def test_run_dir_feed_reports_an_unreadable_line_and_goes_on(tmp_path):
    write_run_dir(tmp_path, [started()])
    with (tmp_path / "events.jsonl").open("a") as handle:
        handle.write("{not json\n")
    write_run_dir(tmp_path, [step(1, active=[0])])
    events = RunDirFeed.open(tmp_path).drain()
    assert [type(e).__name__ for e in events] == ["RunStarted", "RunWarning", "StepMetrics"]
    assert "line 2 unreadable" in events[1].message


def test_live_run_hands_the_training_error_to_the_main_thread(monkeypatch):
    import lowmem_tune.train

    def failing_run(profile, resume, sink, control):
        sink.emit(Info("loading"))
        raise UserError("model.name: 'nope' is not in the catalog")

    monkeypatch.setattr(lowmem_tune.train, "run_training", failing_run)
    run = LiveRun(Profile(), resume=False)
    run.start()
    with pytest.raises(UserError, match="not in the catalog"):
        run.finish()
    assert run.feed.closed is False  # the Info is still queued for the dashboard
    assert [e.message for e in run.feed.drain()] == ["loading"]
    assert run.feed.closed


def strategy_panel_text(info: dict, metrics: dict, shown: str) -> str:
    """The strategy panel's text once it shows `shown` (the panel redraws on a timer, after the
    state has taken the event)."""

    async def scenario() -> str:
        feed = QueueFeed()
        app = DashboardApp(feed, control=RunControl())
        async with app.run_test(size=(160, 48)) as pilot:
            event = started()
            event.strategy, event.strategy_info = info["name"], info
            feed.emit(event)
            feed.emit(StepMetrics({"step": 7, "total_steps": TOTAL_STEPS, "loss": 2.0, **metrics}))
            await wait_for(pilot, lambda: shown in text_of(app.query_one(StrategyPanel)))
            return text_of(app.query_one(StrategyPanel))

    return asyncio.run(scenario())


def test_strategy_panel_shows_galore_refresh_welore_components_and_trainable_share():
    galore = strategy_panel_text({"name": "galore", "rank": 32, "update_proj_gap": 50},
                                 {"next_refresh_in": 13, "projectors_refreshed": 4}, shown="next subspace refresh")
    assert "rank 32" in galore and "update_proj_gap 50" in galore
    assert "next subspace refresh in 13 steps   (4 projectors refreshed last step)" in galore
    welore = strategy_panel_text({"name": "welore", "lrc": 10, "n_lrc": 18, "rank_reduction_achieved": 0.3,
                                  "decoder_parameter_reduction": 0.21}, {}, shown="LRC 10")
    assert "LRC 10 low-rank matrices · N-LRC 18 · rank reduction 30% · decoder parameters −21%" in welore
    lora = strategy_panel_text({"name": "qlora", "lora_rank": 16, "base_bits": 4, "trainable_parameters": 1_250,
                                "total_parameters": 100_000}, {}, shown="trains")
    assert "trains 1,250 of 100,000 parameters (1.25%)" in lora and "lora_rank 16" in lora


def test_redraw_pacer_keeps_the_ui_share_within_its_budget():
    pacer = RedrawPacer(budget=0.02, fastest_s=1.0, slowest_s=5.0)
    assert pacer.next_interval(cpu_s=0.005) == 1.0  # cheap redraws: as often as allowed
    # 50 ms spent since the last redraw: the next waits until 50 ms more would be 2% of the time
    assert pacer.next_interval(cpu_s=0.05) == pytest.approx(2.5)
    assert pacer.next_interval(cpu_s=0.5) == 5.0  # never slower than slowest_s


def test_dashboard_redraws_less_often_when_drawing_is_expensive(monkeypatch):
    """The app's tick asks the pacer with the UI thread's own CPU time: a redraw made to cost
    ~0.2 s of CPU spaces the ticks out to the pacer's slowest."""
    delays: list[float] = []

    class RecordingPacer(RedrawPacer):
        def next_interval(self, cpu_s: float) -> float:
            delays.append(super().next_interval(cpu_s))
            return 0.05  # keep the test short: only the pacer's answer matters

    def busy(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    async def scenario() -> None:
        app = DashboardApp(QueueFeed(), control=RunControl())
        app.pacer = RecordingPacer(budget=0.02, fastest_s=0.05, slowest_s=5.0)
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: len(delays) >= 1)
            monkeypatch.setattr(app, "pull_events", lambda: busy(0.2))
            count = len(delays)
            await wait_for(pilot, lambda: len(delays) >= count + 2)

    asyncio.run(scenario())
    assert delays[-1] == 5.0


@pytest.mark.parametrize("nvml_index", [1, None])
def test_the_memory_panel_polls_the_nvml_index_the_run_reports(nvml_index):
    """cuda:0 under CUDA_VISIBLE_DEVICES=1 is NVML's GPU 1: the dashboard asks NVML for the index the
    run found by UUID, never for the torch index; without one it shows no other card's figures."""
    feed = QueueFeed()
    polled: list[int] = []

    def gpu_stats(index: int) -> GpuStats:
        polled.append(index)
        return GpuStats(used_bytes=3 * GIB, total_bytes=24 * GIB, utilization_percent=50, temperature_c=60,
                        power_w=250.0)

    async def scenario() -> None:
        app = DashboardApp(feed, control=RunControl(), gpu_stats=gpu_stats)
        async with app.run_test(size=(160, 48)) as pilot:
            run = started()
            run.device, run.gpu_name, run.gpu_nvml_index = "cuda:0", "NVIDIA GeForce RTX 4090", nvml_index
            feed.emit(run)
            feed.emit(step(1, active=[1, 5]))
            await wait_for(pilot, lambda: app.state.metrics.get("step") == 1)
            await pilot.pause(1.2)  # at least one more tick
            if nvml_index is None:
                assert polled == []
            else:
                assert polled and set(polled) == {nvml_index}

    asyncio.run(scenario())


def test_summary_line_after_the_dashboard_carries_the_accuracies():
    from lowmem_tune.tui import summary_line

    state = RunState()
    for event in (started(), step(20, active=[1]),
                  EvalResult("baseline", {"tasks": {"synthetic-boolq": {"acc": 0.495, "n": 200}}}),
                  EvalResult("final", {"tasks": {"synthetic-boolq": {"acc": 1.0, "n": 200}}}),
                  RunFinished("completed", 20, "", "runs/test/final")):
        state.apply(event)
    line = summary_line(state)
    assert "run completed at step 20" in line and "synthetic-boolq acc 0.495 → 1.000" in line
    assert "model saved to runs/test/final" in line


def test_the_loss_chart_turns_logarithmic_past_two_decades():
    from lowmem_tune.tui.chart import render_line_chart

    def text(rows):
        return ["".join(run for run, _ in row) for row in rows]

    falling = [(s, 10.0 * 0.9 ** s) for s in range(80)]  # 10 down to about 0.002
    log_rows = text(render_line_chart(falling, [], 60, 12))
    assert log_rows[-1].lstrip().startswith("log y")
    top, bottom = (float(row.split("┤")[0]) for row in (log_rows[0], log_rows[-2]))
    assert top == pytest.approx(10.0) and bottom == pytest.approx(10.0 * 0.9 ** 79, rel=0.05)
    # on a log axis a geometric decay is a straight line: the curve reaches the middle rows half way
    middle = len(log_rows) // 2 - 1
    first_dot = min(i for i, ch in enumerate(log_rows[middle]) if 0x2800 < ord(ch) <= 0x28FF)
    assert 0.3 < (first_dot - 8) / 52 < 0.7
    narrow = text(render_line_chart([(s, 3.0 - 0.01 * s) for s in range(80)], [], 60, 12))
    assert not narrow[-1].lstrip().startswith("log y")


def test_a_real_run_on_the_dashboard_logs_no_library_progress_bars_and_one_baseline_line(tmp_path):
    from lowmem_tune.profile import profile_from_dict

    profile = profile_from_dict({
        "model": {"name": "tiny-llama", "init": "random"}, "hardware": {"device": "cpu"},
        "strategy": {"name": "full"},
        "data": {"dataset": "synthetic-boolq", "num_examples": 64, "max_seq_len": 48, "heldout": 8},
        "train": {"max_steps": 3, "micro_batch_size": 4, "activation_checkpointing": False, "save_every": 100},
        "output": {"dir": str(tmp_path / "run")},
        "eval": {"tasks": ["synthetic-boolq"], "baseline": True, "limit": 8},
    })
    run = LiveRun(profile, resume=False)

    async def scenario() -> str:
        app = DashboardApp(run.feed, control=run.control)
        async with app.run_test(size=(200, 60)) as pilot:
            run.start()
            await wait_for(pilot, lambda: app.state.finished is not None, timeout=60)
            await pilot.pause(1.2)
            return log_text(app)

    text = asyncio.run(scenario())
    assert run.finish() == 0
    assert "runcompletedatstep3" in text
    for noise in ("Writingmodelshards", "Loadingweights", "it/s", "%|"):
        assert noise not in text
    assert text.count("baseline") == 1 and "baselineeval:synthetic-boolqacc=" in text
