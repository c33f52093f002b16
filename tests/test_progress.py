"""Progress bars: no cursor codes in log files; transient and nested on a terminal."""
import io
import sys

from ldm.progress import progress_bar


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
