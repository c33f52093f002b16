"""Progress bars: no cursor codes in log files; transient and nested on a terminal."""
import io
import sys

import pytest

from ldm.progress import progress_bar


@pytest.fixture(autouse=True)
def bars_enabled(monkeypatch):
    """These tests draw bars: a TQDM_DISABLE in the caller's environment must not hide them."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def nested_run(stream, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stream)
    for _ in progress_bar(range(2), desc="outer", leave=True):
        for _ in progress_bar(range(3), desc="DDIM"):
            pass
    return stream.getvalue()


def test_a_log_file_gets_no_cursor_codes_and_keeps_each_finished_bar(monkeypatch):
    text = nested_run(io.StringIO(), monkeypatch)
    assert "\x1b[" not in text
    assert text.count("DDIM: 100%") == 2 and text.count("outer: 100%") == 1
    assert text.endswith("\n")


def test_a_terminal_gets_nested_bars_that_vanish_when_done(monkeypatch):
    text = nested_run(Terminal(), monkeypatch)
    assert "\x1b[A" in text  # the inner bar drawn one line below the outer one
    last = text.rsplit("\r", 1)[-1]
    assert last.startswith("outer: 100%")  # what stays on screen: the outer bar only


def test_tqdm_disable_in_the_environment_silences_every_bar(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert nested_run(io.StringIO(), monkeypatch) == ""
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert "DDIM: 100%" in nested_run(io.StringIO(), monkeypatch)


def test_a_log_file_gets_a_line_every_few_seconds_at_most():
    """Each redraw in a file is a new line: tqdm's 0.1 s would write a long run's log full."""
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval >= 1
    with progress_bar(range(3), file=Terminal()) as bar:  # a terminal redraws in place
        assert bar.mininterval < 1


def test_bars_vanish_when_done_on_a_terminal_unless_asked_to_stay():
    with progress_bar(range(1), file=Terminal()) as bar:
        assert bar.leave is False
    with progress_bar(range(1), file=Terminal(), leave=True) as bar:
        assert bar.leave is True


def test_tqdm_disable_reads_false_and_no_in_any_case(monkeypatch):
    for off in ("False", "NO", " false "):
        monkeypatch.setenv("TQDM_DISABLE", off)
        assert "DDIM: 100%" in nested_run(io.StringIO(), monkeypatch), off
    monkeypatch.setenv("TQDM_DISABLE", "True")
    assert nested_run(io.StringIO(), monkeypatch) == ""
