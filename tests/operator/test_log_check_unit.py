"""What the operator-log check lets through (tests/fixtures/operator.py): only kopf's watch
generators failing to close at the loop's shutdown and unclosed sockets reported at exit,
nothing that looks like them."""

from __future__ import annotations

from tests.fixtures.operator import _drop_exit_resource_warnings, _drop_watch_close_race

WATCH = "/venv/site-packages/kopf/_cogs/clients/watching.py"
RACE = f"""\
2026-12-04 22:27:50,578 INFO hostdev.operator.leader: Lease ns/op released
2026-12-04 22:27:50,579 ERROR asyncio: an error occurred during closing of asynchronous generator <async_generator object infinite_watch at 0x7f411a751540>
asyncgen: <async_generator object infinite_watch at 0x7f411a751540>
Traceback (most recent call last):
  File "{WATCH}", line 88, in infinite_watch
    yield raw_event
GeneratorExit

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "{WATCH}", line 75, in infinite_watch
    async with streaming_block(
  File "/usr/lib/python3.11/contextlib.py", line 267, in __aexit__
    raise RuntimeError("generator didn't stop after athrow()")
RuntimeError: generator didn't stop after athrow()
2026-12-04 22:27:50,590 INFO hostdev.operator: stopped
"""  # noqa: E501


def test_the_shutdown_race_report_goes_and_the_lines_around_it_stay() -> None:
    out = _drop_watch_close_race(RACE)
    assert "Traceback" not in out and "infinite_watch" not in out
    assert out.splitlines() == [
        "2026-12-04 22:27:50,578 INFO hostdev.operator.leader: Lease ns/op released",
        "2026-12-04 22:27:50,590 INFO hostdev.operator: stopped",
    ]


def test_any_other_ending_is_kept() -> None:
    other = RACE.replace(
        "RuntimeError: generator didn't stop after athrow()\n", "ValueError: a real bug\n"
    )
    assert _drop_watch_close_race(other) == other.rstrip("\n")
    # The report cut off by the end of the log: kept too.
    cut = RACE.split("RuntimeError: generator", maxsplit=1)[0]
    assert _drop_watch_close_race(cut) == cut.rstrip("\n")
    # A watch traceback that is not asyncio's closing report: kept.
    running = RACE.replace("an error occurred during closing of asynchronous generator", "x")
    assert _drop_watch_close_race(running) == running.rstrip("\n")


def test_exit_resource_warnings_go_other_exit_reports_stay() -> None:
    unclosed = (
        "Exception ignored in: <socket.socket fd=7>\n"
        "Traceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/asyncio/selector_events.py", line 1, in __del__\n'
        "ResourceWarning: unclosed <socket.socket fd=7>\n"
    )
    other = unclosed.replace("ResourceWarning: unclosed", "ValueError: a real bug in")
    text = "before\n" + unclosed + other + "after\n"
    assert _drop_exit_resource_warnings(text).splitlines() == [
        "before",
        *other.splitlines(),
        "after",
    ]
