"""The CLI in-process, as `underpar ...` runs it (its own `main`: errors become one line)."""

from __future__ import annotations

import sys

import pytest

from underpar import cli


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `underpar *args`."""
    monkeypatch.setattr(sys, "argv", ["underpar", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err
