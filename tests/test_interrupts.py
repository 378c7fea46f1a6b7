"""Interrupted and concurrent runs of a real spa-prune process (issue 17): SIGINT exits 130 and SIGTERM 143, each
with one line and no traceback, leaving no OUT and no temp file; two runs writing the same OUT leave a whole
model from one of them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from helpers import Builder, as_from_a_terminal

REPO = Path(__file__).resolve().parents[1]


def conv_stack(size: int, layers: int = 12, width: int = 64) -> onnx.ModelProto:
    """Conv/BN/ReLU layers at size x size: verification in onnxruntime takes ~1-3 s at 224."""
    b = Builder()
    y, c = b.input("x", [1, 3, size, size]), 3
    for i in range(layers):
        y = b.relu(b.bn(f"bn{i}", b.conv(f"c{i}", y, c, width), width))
        c = width
    b.output(b.conv("last", y, width, 8))
    return b.model()


def spawn(args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "spa.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)


@pytest.fixture(scope="module")
def import_seconds(tmp_path_factory) -> float:
    """How long the interpreter takes to import the CLI here (the signal must land after that, inside main)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import spa.cli"], check=True, cwd=REPO)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("big") / "in.onnx"
    onnx.save(conv_stack(224), str(p))
    return p


def wait_until_main_runs(proc: subprocess.Popen, fallback_s: float) -> None:
    """Until the child's main() has installed its SIGTERM handler (Linux: the caught-signals mask in
    /proc/PID/status), so that the signal lands inside the run and not in the interpreter's start-up (a fixed
    sleep was flaky when the machine was loaded); elsewhere, sleep the measured import time."""
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        time.sleep(fallback_s)
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        caught = next((ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")), "0")
        if int(caught, 16) >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.02)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "in.onnx")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_signal_during_prune(tmp_path, big_model, import_seconds, sig, code, word):
    (tmp_path / "in.onnx").write_bytes(big_model.read_bytes())
    proc = spawn(["in.onnx", "out.onnx", "--ratio", "0.5", "--fast", "--report", "r.json", "--save-plan", "p.json"],
                 tmp_path)
    wait_until_main_runs(proc, import_seconds)
    time.sleep(0.6)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before the signal (rc {proc.returncode}); the model is too small here")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.splitlines() == [f"spa-prune: {word}, nothing written"], err
    assert leftovers(tmp_path) == [], leftovers(tmp_path)
    assert (tmp_path / "in.onnx").read_bytes() == big_model.read_bytes()


def test_two_runs_write_the_same_output(tmp_path):
    import onnxruntime as ort

    onnx.save(conv_stack(64, layers=6), str(tmp_path / "in.onnx"))
    runs = [spawn(["in.onnx", "out.onnx", "--ratio", ratio, "--fast", "-q"], tmp_path) for ratio in ("0.25", "0.5")]
    results = [p.communicate(timeout=120) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], results
    assert leftovers(tmp_path) == ["out.onnx"]
    m = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(m, full_check=True)
    ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    widths = {t.dims[0] for t in m.graph.initializer if t.name == "c0.weight"}
    assert widths <= {48, 32}, widths   # one run's model, whole


def test_in_process_main_keeps_the_signal_handlers(tmp_path):
    """main([...]) called in-process leaves SIGINT/SIGTERM as it found them (no os._exit, no SIG_IGN)."""
    from spa.cli import main

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["analyse", str(tmp_path / "missing.onnx")]) == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_signal_inside_a_lazy_import_is_an_interruption(tmp_path, monkeypatch, capsys):
    """A C extension imported lazily (onnxruntime, torch) turns a signal raised during its initialization into
    ImportError("initialization failed") with the interruption as context: still exit 143, one line."""
    from spa import driver
    from spa.cli import Terminated, main

    def prune(*args, **kwargs):
        try:
            raise Terminated()
        except Terminated:
            raise ImportError("initialization failed")

    onnx.save(conv_stack(8, layers=2, width=4), str(tmp_path / "in.onnx"))
    monkeypatch.setattr(driver, "prune", prune)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--ratio", "0.5", "--fast"]) == 143
    assert capsys.readouterr().err.splitlines() == ["spa-prune: terminated, nothing written"]
    monkeypatch.setattr(driver, "prune", lambda *a, **k: (_ for _ in ()).throw(ImportError("no module x")))
    with pytest.raises(ImportError):  # an import that really failed is not hidden as an interruption
        main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--ratio", "0.5", "--fast"])
