"""One driver per study (fer_tune.tune.runtime.lock), study names, and SIGTERM / SIGHUP handling (fer_tune.tune.runtime.signals), without
Ray: the commands that use them are tested with real Ray in test_study and test_final."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fer_tune.cli import main
from fer_tune.common import FerTuneError, is_plain_name
from fer_tune.tune.runtime import lock, signals

ROOT = Path(__file__).resolve().parents[1]


def hold_in_child(directory: Path):
    """A second process that takes the lock of `directory` and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from fer_tune.tune.runtime import lock
        lock.COMMAND = "fer-tune resume {directory}"
        held = lock.acquire({str(directory)!r}, what="the study")
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_refuses_a_second_command_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    proc = hold_in_child(tmp_path)
    try:
        with pytest.raises(FerTuneError) as exc:
            lock.acquire(tmp_path, what="the study")
        msg = str(exc.value)
        assert (
            f"the study is being run by `fer-tune resume {tmp_path}` (PID {proc.pid} on {socket.gethostname()}, since "
            in msg
            and "\n" not in msg
        )
        info = lock.holder(tmp_path)  # a reader sees it, without taking the lock
        assert info["pid"] == proc.pid and info["verified"] is True
        assert lock.running_line("study", info).startswith("the study is being run now by `fer-tune resume")
    finally:
        proc.kill()
        proc.wait()
    # the holder is gone (SIGKILL): the kernel dropped its flock; its record is stale and is taken over
    assert lock.holder(tmp_path) is None
    held = lock.acquire(tmp_path, what="the study")
    err = capsys.readouterr().err
    assert f"took over the lock left by `fer-tune resume {tmp_path}` (PID {proc.pid}" in err
    assert "no longer running" in err
    assert lock.holder(tmp_path) is None  # this process itself never counts
    held.release()
    assert (tmp_path / ".lock").read_text() == ""  # released: nothing names a holder
    held.release()  # twice is fine


def test_a_lock_from_another_machine_is_respected_unless_forced(tmp_path, capsys):
    record = {
        "host": "gpu-node-7",
        "pid": 4242,
        "command": "fer-tune extend results/x --num-samples 8",
        "since": "2026-12-01 09:00:00",
    }
    (tmp_path / ".lock").write_text(json.dumps(record))
    info = lock.holder(tmp_path)
    assert info["verified"] is False and info["host"] == "gpu-node-7"
    assert "on another machine (not checked from here)" in lock.running_line("study", info)
    with pytest.raises(
        FerTuneError,
        match=r"locked by `fer-tune extend results/x --num-samples 8` \(PID 4242 on "
        r"gpu-node-7, since 2026-12-01 09:00:00\), on another machine.*--force",
    ):
        lock.acquire(tmp_path, what="the study")
    with lock.acquire(tmp_path, what="the study", force=True):
        assert "--force: took over the lock held by" in capsys.readouterr().err
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_reused_pid_is_not_a_holder(tmp_path):
    """A record whose PID now belongs to another process (another start time) names nobody."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": lock._start_ticks(os.getpid())}
    parent = {**me, "pid": os.getppid(), "start_ticks": lock._start_ticks(os.getppid())}
    (tmp_path / ".lock").write_text(json.dumps(parent))
    assert lock.holder(tmp_path)["pid"] == os.getppid()
    (tmp_path / ".lock").write_text(json.dumps({**parent, "start_ticks": parent["start_ticks"] - 1}))
    assert lock.holder(tmp_path) is None


def test_a_holder_that_ended_but_was_not_reaped_is_not_a_holder(tmp_path):
    """A killed driver whose parent has not reaped it yet (a zombie: a batch job's orphan under an init that does
    not reap) still has its PID and start time in /proc, but no flock: it runs nothing."""
    proc = hold_in_child(tmp_path)
    try:
        assert lock.holder(tmp_path)["verified"]
        os.kill(proc.pid, signal.SIGKILL)  # not waited for: a zombie until proc.wait()
        deadline = time.monotonic() + 10
        while lock._stat(proc.pid)[:1] != ["Z"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock._stat(proc.pid)[:1] == ["Z"]
        assert lock.holder(tmp_path) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_refused_command_leaves_no_directory_behind(tmp_path):
    d = tmp_path / "results" / "new"
    with pytest.raises(FerTuneError):
        with lock.acquire(d, what="the study", create=True):
            raise FerTuneError("refused")
    assert not (tmp_path / "results").exists()  # the directory and the parent made for it
    (tmp_path / "results").mkdir()
    with lock.acquire(d, what="the study", create=True):
        (d / "study.json").write_text("{}")
    assert (d / "study.json").exists() and (d / ".lock").read_text() == ""


@pytest.mark.parametrize(
    "name, ok",
    [
        ("joint", True),
        ("fer2013_cpu", True),
        ("v1.2-b", True),
        ("_x", True),
        ("../x", False),
        ("a/b", False),
        (".hidden", False),
        ("-rf", False),
        ("a b", False),
        ("", False),
        ("<img>", False),
        ("x" * 129, False),
        ("é", False),
        ("a\nb", False),
    ],
)
def test_plain_names(name, ok):
    assert is_plain_name(name) is ok


@pytest.mark.parametrize("name", ["../escape", ".hidden", "a/b", "-x", "two words"])
def test_sweep_refuses_a_name_that_is_not_plain(tmp_path, capsys, name):
    space = ROOT / "search_spaces" / "smoke.yaml"
    rc = main(["sweep", str(space), "--results", str(tmp_path / "results"), f"--name={name}", "--num-cpus", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"fer-tune: error: --name {name!r}: use letters, digits")
    assert not (tmp_path / "results").exists() and not (tmp_path / "escape").exists()


def test_sweep_refuses_a_study_directory_that_leads_outside_the_results_root(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "results" / "linked").symlink_to(tmp_path / "elsewhere")
    rc = main(
        [
            "sweep",
            str(ROOT / "search_spaces" / "smoke.yaml"),
            "--results",
            str(tmp_path / "results"),
            "--name",
            "linked",
            "--num-cpus",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "outside the results root" in err and len(err.splitlines()) == 1, err
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_space_file_name_must_be_plain(tmp_path, capsys):
    space = tmp_path / "s.yaml"
    space.write_text("name: ../../etc\nspace: {lr: {type: float, low: 0.001, high: 0.1}}\n")
    rc = main(["sweep", str(space), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (
        f"fer-tune: error: {space}: name='../../etc': use letters, digits, '.', '_' and '-' "
        "(at most 128), not starting with '.' or '-'"
    )
    # a file whose name is not a plain name is fine with --name
    odd = tmp_path / "my space.yaml"
    odd.write_text("space: {lr: {type: float, low: 0.001, high: 0.1}}\n")
    rc = main(["sweep", str(odd), "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "the study name of" in err and "pass --name NAME" in err


def test_sigterm_while_no_tune_run_is_a_keyboard_interrupt_with_its_exit_code():
    code = textwrap.dedent("""
        import os, signal, sys, time
        from fer_tune.tune.runtime import signals
        signals.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            sys.exit(signals.exit_code())
        sys.exit(0)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 143, r.stderr
    assert "fer-tune: SIGTERM received: stopping" in r.stderr and "Traceback" not in r.stderr


def test_a_second_signal_stops_at_once_and_releases_the_lock(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from fer_tune.tune.runtime import lock, signals
        held = lock.acquire({str(tmp_path)!r}, what="the study")
        signal.signal(signal.SIGINT, lambda *a: None)  # a run that takes its time to stop (as Tune saving)
        signals.install()
        print("ready", flush=True)
        time.sleep(60)
        sys.exit(0)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None  # the first one asks the run to stop
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 5 and proc.returncode == 129, err  # the exit code of the first signal
    assert "SIGHUP received: stopping" in err and "SIGTERM received again: stopping at once" in err
    assert (tmp_path / ".lock").read_text() == ""
    assert signals.exit_code() == 130  # this process received nothing
