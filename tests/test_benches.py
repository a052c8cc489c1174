"""The benches still run against the code they measure: each at a tiny size, its ratio line printed. Two had
broken unnoticed (bench_cid_step called the training module with an argument it no longer takes; the
train-stream bench's copied pack carried a done-marker the stage driver now refuses)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str, *args: str, timeout: int = 600) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "WARNING" not in r.stderr + r.stdout, r.stderr[-3000:]
    return r.stdout


def test_cid_step_bench_runs():
    out = bench("bench_cid_step.py", "--model", "cid-tiny-rn", "--batch", "16", "--k", "1000", "--teacher-dim", "256",
                "--steps", "1", "--warmup", "0", "--precision", "fp32")
    assert "ratio CID/clip = " in out and "cluster head: centres" in out


def test_balance_bench_runs_and_the_stage_keeps_the_reference_set():
    out = bench("bench_balance.py", "--n", "3000", "--k", "8", "--reps", "1", "--sklearn-n", "0")
    assert "same kept set: True" in out


def test_train_stream_bench_measures_train_memory(small_run, tmp_path):
    """Part (b): the train stage through the CLI on the replicated packs of N and 4N pairs (part (c) runs the
    same configs and replicated packs through the eval stage, at three times the cost: run by hand)."""
    out = tmp_path / "train_stream.txt"
    printed = bench("bench_train_stream.py", "--workdir", small_run.workdir, "--small", "--copies", "1",
                    "--steps", "2", "--parts", "b", "--out", str(out))
    text = out.read_text()
    assert text == printed
    n, n4 = map(int, re.search(r"N = (\d+) training pairs, 4N = (\d+)", text).groups())
    assert n4 == 4 * n > 0
    assert "train on N: peak RSS" in text and "train on 4N: peak RSS" in text
    assert "(b) train RSS(4N) / RSS(N) = " in text
