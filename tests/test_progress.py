"""Progress bars: drawn on a terminal only, decided once (stderr.isatty) when a command starts."""

import io

from fastemp import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_and_never_with_no_progress(monkeypatch):
    try:
        monkeypatch.setattr("sys.stderr", io.StringIO())  # a redirected log
        assert progress.decide(True) is False and progress.enabled is False
        monkeypatch.setattr("sys.stderr", _Terminal())
        assert progress.decide(True) is True and progress.enabled is True
        assert progress.decide(False) is False and progress.enabled is False  # --no-progress
    finally:
        progress.enabled = True


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
