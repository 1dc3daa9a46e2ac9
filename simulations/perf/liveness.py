"""Rounds that survive real sites, measured on a loopback Deployment Engine (TLS, node authentication).

    python -m fedmeta.simulations.perf.liveness [--deadline 60] [--timeout 300] [--out liveness.json]

One SuperLink and three training SuperNodes on the smoke federation run ``--rounds`` rounds with
``round-deadline`` = ``--deadline`` s, ``round-timeout`` = ``--timeout`` s, ``round-quorum`` = 0.5 and
``max-missed-rounds`` = 2. During the run, by the rounds finished:

1. after round 2, site 0's SuperNode (its whole process group) is SIGSTOPped: it stays connected
   until its heartbeats run out, and answers nothing;
2. after round 6, site 1's SuperNode is SIGKILLed;
3. after round 9, a fourth site's SuperNode starts (provisioned and registered at the start).

It prints every round (seconds, sites sampled/answered, how the round closed, drops by kind) and
three figures: the longest round with a hung site against round-timeout, the rounds until a killed
site is out of sampling, the round in which the late site first trained.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedmeta.common.jsonio import write_json
from fedmeta.server.metrics import METRICS_NAME, read_metrics
from fedmeta.simulations.engines.processes import run_command
from fedmeta.simulations.experiments.presets import load_preset

# The generator and the Flower runtime load torch: measure imports them, so that --help does not wait for them.

REPO_ROOT = Path(__file__).resolve().parents[2]


def _records(out_dir: Path) -> list[dict[str, Any]]:
    try:
        return [r for r in read_metrics(out_dir / METRICS_NAME) if r["round"] > 0]
    except (OSError, ValueError):
        return []


def measure(work: Path, *, rounds: int, deadline: float, timeout: float) -> dict[str, Any]:
    from fedmeta.common.synth import generate_federation, load_manifest
    from fedmeta.simulations.engines.flower_runtime import LocalDeployment

    federation = generate_federation(work / "smoke", "smoke", seed=0)
    train = [site.folder() for site in load_manifest(federation).train_sites]
    sites = [train[0], train[1], train[2], train[0]]  # the late site reads site 0's data: liveness, not learning
    out_dir = work / "out"
    overrides, _driver = load_preset("smoke")
    run_config = {**overrides, "out-dir": str(out_dir), "num-rounds": rounds, "eval-every": 0, "min-sites": 1,
                  "round-deadline": deadline, "round-timeout": timeout, "round-quorum": 0.5, "max-missed-rounds": 2}
    events: dict[str, float] = {}
    with LocalDeployment(sites, roles=["train"] * 4, late=[3], flwr_home=work / "flwr-home") as deployment:
        supernode = {i: deployment.pids[1 + i] for i in range(3)}  # the SuperLink is pids[0]
        finished: dict[str, Any] = {}

        def run() -> None:
            try:
                finished["outcome"] = deployment.run(REPO_ROOT, run_config, timeout_s=rounds * timeout)
            except Exception as err:  # noqa: BLE001 - reported below
                finished["error"] = err

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        began = time.monotonic()

        def after(server_round: int) -> bool:
            while runner.is_alive():
                if any(r["round"] >= server_round for r in _records(out_dir)):
                    return True
                time.sleep(0.2)
            return False

        try:
            if after(2):
                os.killpg(supernode[0], signal.SIGSTOP)
                events["stopped site 0"] = time.monotonic() - began
                print("after round 2: SIGSTOP site 0", flush=True)
            if after(6):
                os.killpg(supernode[1], signal.SIGKILL)
                events["killed site 1"] = time.monotonic() - began
                print("after round 6: SIGKILL site 1", flush=True)
            if after(9):
                deployment.start_supernode(3)
                events["started site 3"] = time.monotonic() - began
                print("after round 9: started site 3", flush=True)
            runner.join()
        finally:
            try:
                os.killpg(supernode[0], signal.SIGCONT)  # so the deployment can stop it
            except ProcessLookupError:
                pass
        if "error" in finished:
            raise finished["error"]
    records = _records(out_dir)
    return {"run_config": run_config, "events_seconds": events, "rounds": records,
            "figures": _figures(records, deadline, timeout)}


def _figures(records: list[dict[str, Any]], deadline: float, timeout: float) -> dict[str, Any]:
    by_round = {r["round"]: r for r in records}
    hung_rounds = [r for r in records if 3 <= r["round"] <= 6]
    kill_round = next((r["round"] for r in records if r["round"] > 6 and r["dropped"]), None)
    out_of_sampling = next((r["round"] for r in records
                            if r["round"] > 6 and r["sites_sampled"] < by_round[6]["sites_sampled"]), None)
    late_trained = next((r["round"] for r in records if r["round"] > 9
                         and r["sites_answered"] > by_round[9]["sites_answered"]), None)
    return {
        "round_deadline_s": deadline,
        "round_timeout_s": timeout,
        "longest_round_with_hung_site_s": max((r["seconds"] for r in hung_rounds), default=None),
        "hung_site_drops": sorted({d["kind"] for r in hung_rounds for d in r["dropped"]}),
        "killed_after_round": 6,
        "first_round_with_killed_site_dropped": kill_round,
        "first_round_without_killed_site_sampled": out_of_sampling,
        "late_site_started_after_round": 9,
        "first_round_late_site_trained": late_trained,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=16, help="rounds (default 16, at least 12)")
    # 60 s: Flower 1.41 declares a SuperNode that stopped heart-beating gone after 2 x 30 s, so a deadline of
    # 60 s or more takes a killed site out within the round it died in; well above a healthy round here.
    parser.add_argument("--deadline", type=float, default=60.0, help="round-deadline, seconds (default 60)")
    parser.add_argument("--timeout", type=float, default=300.0, help="round-timeout, seconds (default 300)")
    parser.add_argument("--out", type=Path, help="also write everything to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 12:
        parser.error(f"--rounds {args.rounds}: the events happen after rounds 2, 6 and 9; give at least 12.")
    if not 0 < args.deadline <= args.timeout:
        parser.error(f"--deadline {args.deadline:g} must be > 0 and at most --timeout {args.timeout:g}.")
    with tempfile.TemporaryDirectory(prefix="fedmeta-liveness-") as work:
        result = measure(Path(work), rounds=args.rounds, deadline=args.deadline, timeout=args.timeout)
    print(f"{'round':>5} {'seconds':>8} {'sampled':>7} {'answered':>8} {'closed by':>9}  dropped")
    for r in result["rounds"]:
        drops = ", ".join(f"{d['kind']}" for d in r["dropped"]) or "-"
        print(f"{r['round']:>5} {r['seconds']:>8.1f} {r['sites_sampled']:>7} {r['sites_answered']:>8} "
              f"{r.get('closed_by', '?'):>9}  {drops}{'  benched ' + str(len(r['benched'])) if r.get('benched') else ''}")
    for key, value in result["figures"].items():
        print(f"{key}: {value}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "liveness"))  # SIGTERM stops the deployment as Ctrl-C does
