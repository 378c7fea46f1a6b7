"""Candidate evaluation on a Ray cluster (issue 14): a real local Ray instance (127.0.0.1, 2 CPUs, no dashboard),
started once for the module and stopped after it.

- same results: for a fixed seed the history and the chosen plan of `random`, `dist` and `ppo-gnn` are the local
  executor's (identical numbers: workers and the local run compute with one thread each);
- a worker killed mid-search (SIGKILL from inside an evaluation) is restarted, its candidate retried, and the
  search ends with the same history;
- from the command line: `--executor ray` searches on the cluster (report and summary say so); a dead
  `--ray-address` is one error line, exit 2, before any work; Ctrl-C stops the search, writes nothing and leaves
  no Ray process behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import as_from_a_terminal, labeled_noise_calib

pytest.importorskip("gymnasium")
ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
models = pytest.importorskip("spa.models")

from spa.cli import main
from spa.search import CalibEvaluator, FunctionEvaluator, RayExecutor, SearchProblem, search
from spa.search.executor import LocalExecutor, connect

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for the module: 2 CPUs on 127.0.0.1, no dashboard; stopped afterwards."""
    assert connect(None, num_cpus=2), "Ray was already initialized in this test process"
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def resnet18():
    return str(models.zoo_path("resnet18", small=True))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    return labeled_noise_calib(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def problem(resnet18, calib_file):
    return SearchProblem.build(resnet18, target_flops=0.5, calib=calib_file, importance="l2")


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fresh(evaluator):
    evaluator.cache, evaluator.calls, evaluator.measured, evaluator.seconds = {}, 0, 0, 0.0
    return evaluator


# ---- same results ---------------------------------------------------------------------------------------------------
RUNS = [("random", 10, None), ("dist", 10, {"samples": 4}),
        ("ppo-gnn", 10, {"hidden": 16, "batch": 4, "epochs": 1, "threads": 1})]


def test_same_history_and_plan_as_local(cluster, resnet18, problem):
    """The re-calibrated reward after the fast refit (the CLI's default reward), one thread on both sides; one
    set of workers serves both policies. A repeated candidate is a cache hit on both sides."""
    evaluator = CalibEvaluator(problem, recalibrate=True, refit="fast", threads=1)
    executor = RayExecutor(evaluator, workers=2)
    try:
        assert executor.describe() == {"kind": "ray", "address": "local", "workers": 2, "threads": 1}
        pids = executor.worker_pids()
        assert len(set(pids)) == 2 and os.getpid() not in pids
        for policy, evals, options in RUNS:
            got = {}
            for name, runner in (("local", "local"), ("ray", executor)):
                with torch_threads(1):
                    plan, h = search(resnet18, policy, problem=problem, evaluator=fresh(evaluator), evals=evals,
                                     seed=3, policy_options=options, executor=runner)
                got[name] = (list(h), h.meta["kept"], sorted(plan.removed.items()), evaluator.calls,
                             evaluator.measured)
            assert got["ray"] == got["local"], policy
            assert len(got["ray"][0]) == evals
        # duplicates inside one batch: measured once, then cache hits, as the local loop counts them
        pj = problem.projector
        a, b = (pj.project(np.random.default_rng(s).uniform(0, 1, len(pj.action_groups))).kept for s in (1, 2))
        assert a.tolist() != b.tolist()
        kept = [a, b, a, a, b]
        flags = {}
        for name, runner in (("local", LocalExecutor(evaluator)), ("ray", executor)):
            fresh(evaluator)
            with torch_threads(1):
                flags[name] = [(ev.cached, ev.reward) for _, ev in runner.map(kept)]
            assert (evaluator.calls, evaluator.measured) == (5, 2)
        assert flags["ray"] == flags["local"]
        assert [c for c, _ in flags["ray"]] == [False, False, True, True, True]
    finally:
        executor.close()
    assert ray.is_initialized()     # the executor did not own the connection: the module's cluster stays up


# ---- faults ---------------------------------------------------------------------------------------------------------
def test_killed_worker_is_restarted_and_the_search_finishes_the_same(cluster, resnet18, problem, tmp_path):
    """One worker SIGKILLs itself inside its evaluation of the 5th candidate (counted over both workers in a file);
    Ray restarts it and retries the candidate; history and plan equal the local run's."""
    calls, marker = tmp_path / "calls", tmp_path / "killed"

    # nested functions: shipped to the workers by value (this test module is not importable there)
    def planted(ratios):
        return float(-np.sum((ratios - 0.4) ** 2))

    def reward(ratios):
        with calls.open("a") as f:
            f.write("x")
        if calls.stat().st_size >= 5 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return planted(ratios)

    local_plan, local = search(resnet18, "random", problem=problem, evaluator=FunctionEvaluator(problem, planted),
                               evals=12, seed=5)
    executor = RayExecutor(FunctionEvaluator(problem, reward), workers=2)
    try:
        before = set(executor.worker_pids())
        plan, h = search(resnet18, "random", problem=problem, evaluator=executor.evaluator, evals=12, seed=5,
                         executor=executor)
        after = set(executor.worker_pids())
    finally:
        executor.close()
    killed = int(marker.read_text()) if marker.exists() else None
    assert killed in before                                           # a worker did die mid-search
    # ... and was replaced: two workers again, the killed one not among them (its pair may be restarted too when
    # the kill closes a socket they share, as seen once under load in CI; the search must not care)
    assert len(after) == 2 and killed not in after
    assert list(h) == list(local) and h.meta["kept"] == local.meta["kept"]
    assert sorted(plan.removed.items()) == sorted(local_plan.removed.items())
    assert executor.evaluator.measured == 12


# ---- command line ---------------------------------------------------------------------------------------------------
def run(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_searches_on_ray(cluster, resnet18, calib_file, tmp_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "rep.json"
    rc, err = run([resnet18, out, "--policy", "random", "--target-flops", 0.5, "--calib", calib_file, "--evals", 6,
                   "--executor", "ray", "--report", rep, "--seed", 2, "--fast"], capsys)
    assert rc == 0, err
    s = json.loads(rep.read_text())["search"]
    assert s["executor"] == {"kind": "ray", "address": "local", "workers": 2, "threads": 1}
    assert s["evaluations"] == 6 and len(s["history"]) == 6
    assert "on Ray (2 workers)" in err and out.exists()
    assert ray.is_initialized()    # the CLI used the connection it found and left it up


def spa_prune(argv, cwd) -> subprocess.Popen:
    """The command as a process of its own (no Ray connection inherited from this test process)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "spa.cli", *map(str, argv)],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, preexec_fn=as_from_a_terminal)


def test_dead_address_is_one_line_before_any_work(resnet18, tmp_path):
    out = tmp_path / "out.onnx"
    t0 = time.perf_counter()
    proc = spa_prune([resnet18, out, "--policy", "random", "--target-flops", 0.5, "--executor", "ray",
                      "--ray-address", "127.0.0.1:1"], tmp_path)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("spa-prune: error: no Ray cluster at 127.0.0.1:1"), err
    assert not out.exists() and time.perf_counter() - t0 < 20.0


@pytest.mark.parametrize("argv, fragment", [
    (["--policy", "random", "--target-flops", 0.5, "--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--target-flops", 0.5, "--executor", "ray"], "--executor needs --policy"),
    (["--policy", "random", "--target-flops", 0.5, "--executor", "ray", "--ray-address", "nowhere"],
     "--ray-address must be HOST:PORT"),
])
def test_bad_executor_flags_are_one_line(resnet18, tmp_path, capsys, argv, fragment):
    rc, err = run([resnet18, tmp_path / "out.onnx", *argv], capsys)
    assert rc == 2 and err.count("\n") == 1 and fragment in err, err


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid` with its command line (Ray's daemons are the driver's children, its
    workers the raylet's)."""
    rows = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    children: dict[int, list[tuple[int, str]]] = {}
    for row in rows:
        child, parent, args = (row.split(None, 2) + [""])[:3]
        children.setdefault(int(parent), []).append((int(child), args))
    out, todo = {}, [pid]
    while todo:
        for c, args in children.get(todo.pop(), []):
            out[c] = args
            todo.append(c)
    return out


def alive(pids) -> set[int]:
    live = set()
    for p in pids:
        try:
            os.kill(p, 0)
            live.add(p)
        except ProcessLookupError:
            pass
    return live


@pytest.mark.parametrize("sig, rc, message", [
    (signal.SIGINT, 130, "spa-prune: interrupted, nothing written"),
    pytest.param(signal.SIGTERM, 143, "spa-prune: terminated, nothing written", marks=pytest.mark.slow),
])
def test_ctrl_c_stops_the_search_and_writes_nothing(resnet18, calib_file, tmp_path, sig, rc, message):
    """A real process with its own local Ray instance, signalled while its workers evaluate candidates."""
    if shutil.which("ps") is None:
        pytest.skip("needs ps to see Ray's processes")
    out = tmp_path / "out.onnx"
    proc = spa_prune([resnet18, out, "--policy", "random", "--target-flops", 0.5, "--calib", calib_file, "--evals",
                      5000, "--executor", "ray"], tmp_path)
    try:
        deadline, ray_pids = time.time() + 120, {}
        while time.time() < deadline and proc.poll() is None:
            ray_pids.update(descendants(proc.pid))
            if any("EvaluatorWorker.measure" in args for args in ray_pids.values()):   # searching
                break
            time.sleep(0.5)
        time.sleep(1)
        ray_pids.update(descendants(proc.pid))
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(sig)
        try:
            err = proc.communicate(timeout=90)[1]
        except subprocess.TimeoutExpired:   # stuck: the faulthandler prints every thread's stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            pytest.fail("no exit 90 s after the signal:\n" + proc.communicate(timeout=30)[1])
        code = proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == rc, err
    assert err.strip().splitlines()[-1] == message, err
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))
    time.sleep(3)
    assert not alive(ray_pids), f"Ray processes left behind: {alive(ray_pids)}"
