"""Run the fuzz harnesses for N executions each and print executions, exec/s and wall time.

    python fuzz/run.py                      # every harness, 1,000,000 executions each, one at a time
    python fuzz/run.py -n 20000 jws der     # some harnesses, fewer executions
    python fuzz/run.py -j 2 --tolerate RecursionError

Each harness runs as `nice -n 10 python fuzz/fuzz_<name>.py -runs=N -seed=S` with its corpus
in fuzz/work/<name> (kept between runs, so a second run continues from what the first found)
and its log in fuzz/logs/<name>.log; crash inputs are written to fuzz/logs/crash-<sha1>.
Exit status 1 if any harness crashed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
HARNESSES = sorted(p.stem[len("fuzz_"):] for p in FUZZ.glob("fuzz_*.py"))


def start(name: str, runs: int, seed: int, env: dict) -> tuple[subprocess.Popen, float]:
    logs = FUZZ / "logs"
    logs.mkdir(exist_ok=True)
    cmd = ["nice", "-n", "10", sys.executable, str(FUZZ / f"fuzz_{name}.py"), f"-runs={runs}", f"-seed={seed}",
           "-timeout=25", "-print_final_stats=1", f"-artifact_prefix={logs}/"]
    log = open(logs / f"{name}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=FUZZ.parent), time.monotonic()


def summary(name: str, rc: int, wall: float) -> str:
    text = (FUZZ / "logs" / f"{name}.log").read_text(errors="replace")
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    n = int(execs[-1]) if execs else 0
    verdict = "ok" if rc == 0 else ("CRASH" if "Uncaught Python exception" in text else f"exit {rc}")
    rate = n / wall if wall else 0  # start-up (imports, seed generation) included
    return f"{name:14} {n:>10,} execs  {rate:>8.0f} exec/s  {wall:>8.0f} s  {verdict}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("harness", nargs="*", help=f"default: all ({', '.join(HARNESSES)})")
    ap.add_argument("-n", "--runs", type=int, default=1_000_000)
    ap.add_argument("-j", "--jobs", type=int, default=1, help="harnesses at a time")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tolerate", default="", help="FUZZ_TOLERATE: builtin exception names a known bug raises")
    args = ap.parse_args()
    for name in args.harness:
        if name not in HARNESSES:
            ap.error(f"no harness {name!r}; there are {', '.join(HARNESSES)}")
    env = dict(os.environ, FUZZ_TOLERATE=args.tolerate)
    queue, running, lines, failed = list(args.harness or HARNESSES), {}, [], False
    while queue or running:
        while queue and len(running) < max(1, args.jobs):
            name = queue.pop(0)
            running[name] = start(name, args.runs, args.seed, env)
        time.sleep(1)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                failed |= proc.returncode != 0
                lines.append(summary(name, proc.returncode, time.monotonic() - t0))
                print(lines[-1], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
