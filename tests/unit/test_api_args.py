"""`vim-api`'s flags and environment for the event log's write path."""

from __future__ import annotations

import pytest

from vim.api.server import parse_args
from vim.eventlog.store import DEFAULT_COMMIT_GATHER_TURNS, EventLogConfig

SECRET = "s" * 32


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VIM_API_COMMIT_GATHER_TURNS", "VIM_AUTH_SECRET_FILE", "VIM_API_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VIM_AUTH_SECRET", SECRET)


def test_commit_gathering_is_on_by_default_and_settable() -> None:
    config, _ = parse_args(["--insecure"])
    assert config.commit_gather_turns == DEFAULT_COMMIT_GATHER_TURNS > 0
    config, _ = parse_args(["--insecure", "--commit-gather-turns", "0"])
    assert config.commit_gather_turns == 0


def test_commit_gathering_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIM_API_COMMIT_GATHER_TURNS", "32")
    config, _ = parse_args(["--insecure"])
    assert config.commit_gather_turns == 32


@pytest.mark.parametrize("turns", ["-1", "100001"])
def test_out_of_range_gather_turns_are_refused(
    turns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--insecure", "--commit-gather-turns", turns])
    assert exit_.value.code == 2
    assert f"--commit-gather-turns must be 0-100000, got {turns}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"commit_gather_turns": -1}, "commit_gather_turns must be 0-100000"),
        ({"commit_gather_idle_turns": 0}, "commit_gather_idle_turns must be at least 1"),
        ({"commit_gather_max_s": float("nan")}, "commit_gather_max_s must be within 0-1 s"),
        ({"commit_gather_max_s": 2.0}, "commit_gather_max_s must be within 0-1 s"),
    ],
)
def test_the_event_log_config_refuses_bad_gathering(knobs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EventLogConfig(**knobs)  # type: ignore[arg-type]


def test_a_non_number_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VIM_API_COMMIT_GATHER_TURNS", "lots")
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--insecure"])
    assert exit_.value.code == 2
    assert "--commit-gather-turns: invalid int value: 'lots'" in capsys.readouterr().err


def test_workers_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VIM_API_WORKERS", "3")
    assert parse_args(["--insecure"])[0].workers == 3
    assert parse_args(["--insecure", "--workers", "2"])[0].workers == 2
    monkeypatch.setenv("VIM_API_WORKERS", "many")
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--insecure"])
    assert exit_.value.code == 2
    assert "VIM_API_WORKERS must be a number of workers, got 'many'" in capsys.readouterr().err
