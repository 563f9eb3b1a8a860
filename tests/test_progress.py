"""Progress: bars drawn on a terminal only (stderr.isatty), plain lines when stdout is not a terminal, decided once
when a command starts."""

import io

from fastemp import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_and_never_with_no_progress(monkeypatch):
    try:
        monkeypatch.setattr("sys.stderr", io.StringIO())  # a redirected log
        monkeypatch.setattr("sys.stdout", io.StringIO())
        assert progress.decide(True) is False and progress.enabled is False and progress.lines is True
        monkeypatch.setattr("sys.stderr", _Terminal())
        monkeypatch.setattr("sys.stdout", _Terminal())
        assert progress.decide(True) is True and progress.enabled is True and progress.lines is False
        # fastemp train > log: the bar on the terminal, lines in the log
        monkeypatch.setattr("sys.stdout", io.StringIO())
        assert progress.decide(True) is True and progress.lines is True
        assert progress.decide(False) is False and progress.enabled is progress.lines is False  # --no-progress
    finally:
        progress.enabled, progress.lines = True, False


def test_a_redirected_training_log_gets_no_progress_bar(tmp_path):
    import subprocess
    import sys

    from test_train import TINY

    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastemp",
                "train",
                *TINY,
                "train.max_steps=3",
                "eval.at_end=false",
                "--out",
                str(tmp_path / "run"),
            ],
            stdout=f,
            stderr=f,
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text and "step/s" not in text and "it/s" not in text, text[-2000:]
    # instead, one plain line per logged step (the first, every train.log_every=2, the last)
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"], text[-2000:]
    assert all(" loss " in line and " images/s " in line and " ETA " in line for line in lines)
