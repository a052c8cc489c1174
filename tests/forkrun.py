"""`python -m cidistill …` runs that each start in a fresh child, without each paying the ~8 s of imports.

A server process imports the CLI and what its stages load (torch, Ray's client, open_clip, img2dataset), runs
nothing, and forks once per command: the child sets the command's environment and argv, runs the command as
`cidistill` does (its exit handlers included) and exits; SIGKILL ends the child as it ends a process started
for the command. The tests that start a command many times in a row (a kill at every stage) use it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SERVER = r'''
import atexit, json, os, sys
import cidistill.app.cli as cli
from cidistill.core.runtime import import_open_clip
import_open_clip()
import img2dataset  # noqa: F401
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["cidistill"] + req["argv"]
        code = 1
        try:
            cli.cli()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            atexit._run_exitfuncs()  # what a process's exit runs (the fault log among them)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
'''


class ForkRunner:
    def __init__(self, cwd: Path, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], cwd=cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], env: dict) -> subprocess.CompletedProcess:
        """Like subprocess.run(["python", "-m", "cidistill", *argv], env=env, capture_output=True, text=True):
        returncode is -9 for a child killed by SIGKILL."""
        self.n += 1
        out, err = self.tmp / f"run-{self.n}.out", self.tmp / f"run-{self.n}.err"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        rc = int(self.proc.stdout.readline())
        return subprocess.CompletedProcess(argv, rc, out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
