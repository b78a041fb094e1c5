"""lab/zygote.py: the fork server of arm processes, with a light server (no torch) whose `run` does what the
test asks: exit with a code, sleep, raise, print a variable. The whole-job tests (tests/test_launch.py) run real
arms forked from the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import subprocess_env

from lab import zygote

pytestmark = pytest.mark.skipif(not zygote.available(), reason="the fork server needs Linux")

ENV = subprocess_env("sqlite:///unused.db")
SERVER = """
import os, sys, time
from lab import zygote

def run(argv):
    what, *rest = argv
    if what == "exit":
        return int(rest[0])
    if what == "sleep":
        time.sleep(float(rest[0]))
        return 0
    if what == "raise":
        raise RuntimeError("boom in the arm")
    if what == "env":  # the arm's environment, its stdin and the pid it runs as, into a file
        with open(rest[1], "w") as out:
            print(os.environ.get(rest[0]), repr(sys.stdin.read()), os.getpid(), file=out)
        return 0

sys.exit(zygote.serve(run, int(sys.argv[-1])))
"""


@pytest.fixture
def server():
    started = zygote.Zygote.start(dict(ENV), command=("-c", SERVER))
    yield started
    started.kill()


def test_each_arm_exits_with_its_own_code_and_the_server_after_the_last(server: zygote.Zygote) -> None:
    arms = [server.fork(["exit", str(code)], server.env) for code in (0, 3, 75)]
    assert [arm.wait(timeout=30) for arm in arms] == [0, 3, 75]
    assert len({arm.pid for arm in arms} | {server.proc.pid}) == 4  # a process each
    server.close()  # no more arms: the server leaves once its arms have
    assert server.proc.wait(timeout=30) == 0


def test_an_arm_is_stopped_by_signal_and_says_so_the_popen_way(server: zygote.Zygote) -> None:
    sleeper, other = server.fork(["sleep", "60"], server.env), server.fork(["sleep", "60"], server.env)
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.2)
    assert sleeper.poll() is None
    sleeper.terminate()
    assert sleeper.wait(timeout=30) == -signal.SIGTERM
    assert other.poll() is None  # only the arm signalled
    other.kill()
    assert other.wait(timeout=30) == -signal.SIGKILL
    sleeper.kill()  # already reaped: nothing is sent, no recycled pid is hit
    assert sleeper.returncode == -signal.SIGTERM


def test_an_arm_takes_its_own_environment_and_not_the_servers_stdin(server: zygote.Zygote, tmp_path: Path) -> None:
    env = server.env | {"CUDA_VISIBLE_DEVICES": "1"}
    arm = server.fork(["env", "CUDA_VISIBLE_DEVICES", str(tmp_path / "seen")], env)
    assert arm.wait(timeout=30) == 0
    assert (tmp_path / "seen").read_text().split() == ["1", "''", str(arm.pid)]


def test_an_arm_that_raises_prints_its_traceback_and_exits_1(capfd: pytest.CaptureFixture) -> None:
    server = zygote.Zygote.start(dict(ENV), command=("-c", SERVER))  # started here: its stderr is captured
    try:
        assert server.fork(["raise"], server.env).wait(timeout=30) == 1
        assert "RuntimeError: boom in the arm" in capfd.readouterr().err  # the arm's stderr is the terminal's
        assert server.fork(["exit", "0"], server.env).wait(timeout=30) == 0  # the server goes on serving
    finally:
        server.kill()


def test_the_arms_die_with_the_server_and_the_server_with_the_launcher(server: zygote.Zygote,
                                                                       tmp_path: Path) -> None:
    arm = server.fork(["sleep", "60"], server.env)
    server.kill()
    assert arm.wait(timeout=30) == -signal.SIGKILL
    assert _gone(arm.pid)
    assert server.fork(["exit", "0"], server.env) is None  # the caller starts a fresh process instead
    # The server itself dies with the process that started it (here a shell killed with SIGKILL).
    script = tmp_path / "launcher.py"
    script.write_text("import sys, time\nfrom lab import zygote\n"
                      f"z = zygote.Zygote.start(dict(__import__('os').environ), command=('-c', {SERVER!r}))\n"
                      "arm = z.fork(['sleep', '60'], z.env)\n"
                      "print(z.proc.pid, arm.pid, flush=True)\ntime.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, str(script)], env=ENV, stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in launcher.stdout.readline().split()]
    launcher.kill()
    launcher.wait()
    assert all(_gone(pid) for pid in pids)


def test_forced_exec_runs_a_fresh_arm_under_the_forked_pid(capfd: pytest.CaptureFixture) -> None:
    """Where CUDA's driver is loaded in the server, the child execs `python -m lab.arm` instead of running on."""
    server = zygote.Zygote.start(ENV | {zygote.EXEC_ENV: "1"}, command=("-c", SERVER))
    try:
        arm = server.fork(["--help"], server.env)
        assert arm.wait(timeout=120) == 0
        assert "--parent-run-id" in capfd.readouterr().out  # lab/arm.py's own argparse answered
    finally:
        server.kill()


def test_a_call_returns_its_value_raises_its_bad_input_line_and_names_a_crash(server: zygote.Zygote) -> None:
    """`call`: a function run in a forked process (the launcher's preflight needs torch and timm, loaded there)."""
    assert server.call("json:dumps", {"obj": [1, "two"]}, server.env) == '[1, "two"]'
    with pytest.raises(ValueError, match="Expecting property name"):  # bad input: its one line, as ValueError
        server.call("json:loads", {"s": "{"}, server.env)
    with pytest.raises(RuntimeError, match="os:getcwd failed in a forked process: TypeError"):
        server.call("os:getcwd", {"nothing": 1}, server.env)
    server.kill()
    assert server.call("json:dumps", {"obj": 1}, server.env) is None  # gone: the caller runs it in-process


def test_only_variables_read_after_the_imports_may_differ_from_the_servers() -> None:
    base = {"PATH": "/bin", "AB_PLACEMENT": "lockstep"}
    assert zygote.forkable(base, base | {"CUDA_VISIBLE_DEVICES": "3", "AB_PLACEMENT": "sequential"})
    assert not zygote.forkable(base, base | {"OMP_NUM_THREADS": "1"})  # torch reads it when imported
    assert not zygote.forkable(base, {"AB_PLACEMENT": "lockstep"})


def test_no_cuda_driver_is_loaded_by_importing_the_arm() -> None:
    """The premise of forking arms: importing torch, Lightning, timm and MLflow does not touch the GPU."""
    code = "import lab.arm; from lab import zygote; print(zygote.cuda_driver_loaded())"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def _gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return True  # a zombie: dead, its parent not yet told
        time.sleep(0.05)
    return False


def test_arms_that_exit_at_once_keep_their_codes_when_forked_from_many_threads(server: zygote.Zygote) -> None:
    """An arm may exit before the thread that forked it has taken its pid, and several threads may fork at once:
    every arm still gets its own exit code (a lost one used to leave `wait` hanging)."""
    codes = [i % 7 for i in range(48)]
    with ThreadPoolExecutor(6) as pool:
        arms = list(pool.map(lambda code: server.fork(["exit", str(code)], server.env), codes))
    assert [arm.wait(timeout=30) for arm in arms] == codes
    assert len({arm.pid for arm in arms}) == len(arms)


def test_an_arm_killed_with_its_server_says_so(server: zygote.Zygote) -> None:
    from lab import launch

    arm = server.fork(["sleep", "60"], server.env)
    server.proc.kill()  # the server alone, as a user or the OOM killer would
    assert arm.wait(timeout=30) == -signal.SIGKILL
    line = launch.exit_line("b", arm.returncode) + launch.server_death(arm, arm.returncode)
    assert line == f"arm b killed by signal 9 (its fork server, pid {server.proc.pid}, killed by signal 9)"
