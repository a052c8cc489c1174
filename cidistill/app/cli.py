"""`cidistill`: one CLI for every stage. `main(argv)` so tests call it in-process.

    cidistill download|embed|balance|cluster|train|eval|export|card  [-c CONFIG] [--set key=value ...]
    cidistill run CONFIG          # the stages listed in the config, in order; finished ones are skipped
    cidistill demo [--small]      # build the emoji demo data, serve it on 127.0.0.1, run everything
    cidistill compare [--demo] [-c CONFIG] [--variants ...]   # the ablation table (cidistill/app/compare.py)
    cidistill config [--check FILE]   # the full configuration as commented YAML (defaults, or FILE resolved)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import traceback

from cidistill.core.runtime import go_offline, init_ray, quiet_logs, set_env_defaults

set_env_defaults()  # before anything imports torch: OpenMP reads its settings when it loads

from cidistill.core import faults  # noqa: E402
from cidistill.core.console import guard_console, release_console, shows_unicode
from cidistill.core.config import STAGES, Config, ConfigError, config_yaml, load_config
from cidistill.core.errors import StageError, Terminated, ask_stop, clear_stop, is_write_error
from cidistill.core.lock import work_lock
from cidistill.core.store import redact, use_storage_options
from ray.exceptions import RayError

from .compare import compare
from .demo import demo_run_config, run_demo
from .registry import check_shared, run_stages


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file")
    p.add_argument("--workdir", help="work folder (overrides the config's workdir)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. train.batch_size=64")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (else RAY_ADDRESS, else start one)")
    p.add_argument("--force", action="store_true", help="redo the stage even if it finished")
    p.add_argument("--no-ray", action="store_true", help="run in this process (debugging)")


def versions() -> str:
    """`cidistill 0.1.0 (torch …, open_clip_torch …, …)` from the installed metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    faiss = next((n for n in ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss") if v(n) != "not installed"), "faiss")
    libs = ("torch", "open_clip_torch", "ray", "img2dataset", faiss, "pyarrow")
    return f"cidistill {v('cidistill')} ({', '.join(f'{n} {v(n)}' for n in libs)})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cidistill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="show every library's log lines and warnings")
    ap.add_argument("--version", action="version", version=versions(),
                    help="this package's version and those of the libraries it runs on")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for s in STAGES:
        _common(sub.add_parser(s, help=f"run the {s} stage"))
    p = sub.add_parser("run", help="run the stages a config lists")
    p.add_argument("run_config", nargs="?", help="YAML config (or -c CONFIG)")
    p.add_argument("--stages", nargs="+", help="subset of stages to run")
    _common(p)
    p = sub.add_parser("config", help="print the full configuration as commented YAML (the defaults, or a file's)")
    p.add_argument("--check", metavar="FILE", help="validate FILE and print its resolved values")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p = sub.add_parser("demo", help="build the emoji demo data and run the whole pipeline on it")
    p.add_argument("--small", action="store_true", help="test-sized data (a few hundred pairs)")
    p.add_argument("--stages", nargs="+", help="subset of stages to run")
    _common(p)
    p = sub.add_parser("compare", help="ablations: the same student under each training recipe, one table")
    p.add_argument("--demo", action="store_true", help="on the demo's data and teacher (after `cidistill demo`)")
    p.add_argument("--small", action="store_true", help="with --demo: the small demo")
    p.add_argument("--variants", nargs="*", help="subset of: clip instance cid cid_unbalanced dcclip config")
    _common(p)
    return ap


def make_config(args, base: dict | None = None) -> Config:
    overrides = list(args.overrides)
    # a flag's value is text as typed (YAML would read `runs/exp [1]` as a list, `my run #2` as `my run`)
    if args.workdir:
        overrides.append(f"workdir={json.dumps(args.workdir)}")
    if args.ray_address:
        overrides.append(f"ray_address={json.dumps(args.ray_address)}")
    path = getattr(args, "run_config", None)
    if args.cmd == "run" and not (path or args.config):
        raise ConfigError("cidistill run needs a config file: cidistill run CONFIG (or -c CONFIG); `cidistill config` "
                          "prints one to start from")
    if path and args.config and path != args.config:
        raise ConfigError(f"two config files given ({path!r} and -c {args.config!r}): give one")
    return load_config(path or args.config, overrides, base=base)


ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours a task's name in its errors, also in a log file


def one_line(e: BaseException) -> str:
    """The message a user acts on: a Ray task's error is its cause's message, never the remote traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    lines = [ln for ln in ANSI.sub("", str(e)).strip().splitlines() if ln.strip()]
    if len(lines) > 1:  # a remote traceback: its last "SomeError: message" line is the cause
        raised = [ln.split("Error: ", 1)[1] for ln in lines if "Error: " in ln and not ln.startswith(" ")]
        lines = raised[-1:] or lines
    return redact(lines[0]) if lines else type(e).__name__  # a URI's password or token never shown


_terminated: list[float] = []  # when _stop ran: a library may re-raise our Terminated as a plain KeyboardInterrupt
SAME_STOP_S = 2.0  # `timeout` signals the process and then its whole group: one stop, two SIGTERMs


def _stop(signum, frame):
    if not _terminated:
        _terminated.append(time.monotonic())
        ask_stop()  # the run's loops see it should a library lose the exception
        raise Terminated()
    if time.monotonic() - _terminated[0] > SAME_STOP_S:  # asked again while cleaning up: stop at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


EXIT_GRACE_S = 30.0  # what the interpreter's exit (Ray's shutdown, loader processes) may take after main()


def cli() -> None:
    """The `cidistill` command. Its results are written and its lock released when main() returns; what the
    exit handlers do after that gets EXIT_GRACE_S: a run stopped by SIGTERM under Ray printed its line and then
    hung in Ray's shutdown for minutes once (a scheduler waits for that exit)."""
    rc = main()

    def end():
        try:  # the local Ray cluster's processes and loader processes go with it (Ray's agents outlived it ~1 min)
            import psutil

            for child in psutil.Process().children(recursive=True):
                try:
                    child.kill()
                except psutil.Error:
                    pass
        except (ImportError, OSError):
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(rc)

    timer = threading.Timer(EXIT_GRACE_S, end)
    timer.daemon = True
    timer.start()
    sys.exit(rc)


def main(argv: list[str] | None = None) -> int:
    verbose = os.environ.get("CIDISTILL_VERBOSE")  # `-v` sets it for this command only (a library may call again)
    streams = guard_console()
    try:
        if threading.current_thread() is not threading.main_thread():
            return _main(argv)
        before = signal.signal(signal.SIGTERM, _stop)  # init_ray keeps it over Ray's own
        _terminated.clear()
        try:
            return _main(argv)
        finally:
            clear_stop()  # what runs after this command in the same process is not stopped
            if not _terminated:  # stopped: ours stays, so that the rest of the same stop arriving now is not fatal
                signal.signal(signal.SIGTERM, before)
    finally:
        if verbose is None:
            os.environ.pop("CIDISTILL_VERBOSE", None)
        else:
            os.environ["CIDISTILL_VERBOSE"] = verbose
        release_console(streams)


def _main(argv: list[str] | None) -> int:
    set_env_defaults()
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["CIDISTILL_VERBOSE"] = "1"
    if args.cmd == "demo" or (args.cmd == "compare" and args.demo):
        go_offline()
    quiet_logs()
    try:
        if args.cmd == "config":
            # where the console is not UTF-8, YAML's own escapes (they load back)
            print(config_yaml(load_config(args.check, args.overrides), unicode=shows_unicode(sys.stdout)), end="")
        elif args.cmd == "demo":
            run_demo(args)
        elif args.cmd == "compare":
            cfg = demo_run_config(args) if args.demo else make_config(args)
            use_storage_options(cfg.storage_options)
            if not args.no_ray:
                check_shared(cfg, list(STAGES))
                init_ray(cfg.ray_address or None)
            with work_lock(cfg.workdir):
                compare(cfg, args.variants, use_ray=not args.no_ray, force=args.force)
        elif args.cmd == "run":
            cfg = make_config(args)
            run_stages(cfg, args.stages or cfg.stages, force=args.force, use_ray=not args.no_ray)
        else:
            cfg = make_config(args)
            run_stages(cfg, [args.cmd], force=args.force, use_ray=not args.no_ray)
    except (ConfigError, StageError, FileNotFoundError) as e:
        print(f"cidistill: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RayError as e:  # a task or actor failed for good: its cause, in one line
        print(f"cidistill: error: stage {faults.current_stage()!r}: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what finished is kept, as after a kill
        if os.environ.get("CIDISTILL_VERBOSE"):
            traceback.print_exc()
        stage, term = faults.current_stage(), bool(_terminated)
        print(f"cidistill: {'stopped by SIGTERM' if term else 'interrupted'}"
              f"{f' during stage {stage!r}' if stage != 'none' else ''}; finished work is kept: run the same command "
              "again to resume", file=sys.stderr)
        return 128 + signal.SIGTERM if term else 130
    except OSError as e:
        stage = faults.current_stage()
        if is_write_error(e):  # disk full, unwritable folder: keep what finished
            where = f"stage {stage!r} could not write its output" if stage != "none" else "could not write"
            print(f"cidistill: error: {where}: {redact(str(e))}. Finished shards are kept; free space or fix permissions and "
                  "rerun to resume.", file=sys.stderr)
            return 3
        print(f"cidistill: error: {f'stage {stage!r}: ' if stage != 'none' else ''}{one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
