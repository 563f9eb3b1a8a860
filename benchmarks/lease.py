"""The accuracy lease (issue 21) in three device calls, `benchmarks/gpu_suite.sh --lease call1|call2|call3 OUT`:
call 1 the smoke part and its gate, call 2 the accuracy part under the gate, call 3 profile and throughput20; each
ends by itself within CALL_SECONDS. docs/benchmarks.md has the exact `run` commands."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .report import read_result
from .suite import Suite

CALLS = {"call1": (230, ["smoke"]), "call2": (550, ["accuracy"]), "call3": (200, ["profile", "throughput20"])}
NO_GATE = {"overrides": [], "peer": "run"}  # every fast path on, the official run too


def lease(call: str, out: str) -> int:
    env, state = os.environ, Path(os.environ.get("LEASE_STATE") or "runs/lease").resolve()
    seconds, details = float(env.get("CALL_SECONDS") or CALLS[call][0]), state / call
    env.update(SUITE_DEADLINE=str(time.time() + seconds), SUITE_DETAILS=str(details))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state / "inductor"))  # call 2 reuses call 1's compilations
    if (details / "accuracy.json").exists():  # a call 2 again: what it measured is the history now
        env.setdefault("ACCURACY_HISTORY", str(shutil.copy(details / "accuracy.json", state / "accuracy.json")))
    shutil.rmtree(details, ignore_errors=True)
    print(f"lease: {call}: {seconds:.0f} s, results into {out} (details: {details})")
    if call == "call1":
        env.setdefault("SMOKE_ITEMS", "environment,check,train,large_n")
        status = Suite(out).run(["smoke"])
        stop = f"call 1 wrote no readable smoke gate ({out}/smoke.json)"
        gate = (read_result(Path(out) / "smoke.json") or {}).get("gate") or {**NO_GATE, "stop": stop}
        (state / "gate.json").write_text(json.dumps(gate))
        if gate["stop"]:
            print(f"lease: STOP: {gate['stop']}. Do not run call 2 as it is: fix it (docs/check.md), run call 1 again.")
            return 3
        print(f"lease: call 1 {'passed' if status == 0 else 'had failures (smoke.json): the gate accounts for them'}")
        print(
            f"lease: next: LEASE_OVERRIDES='{' '.join(gate['overrides'])}' LEASE_PEER='{gate['peer']}' CALL_SECONDS="
            '<min(550, budget_left_s - 40)> bash benchmarks/gpu_suite.sh --lease call2 "$OUT"'
        )
        return status
    if "LEASE_OVERRIDES" in env or "LEASE_PEER" in env:  # the command line's, else call 1's on this machine
        gate = {"overrides": env.get("LEASE_OVERRIDES", "").split(), "peer": env.get("LEASE_PEER") or "run"}
    else:
        gate = read_result(state / "gate.json") or NO_GATE
        if not (state / "gate.json").exists():
            print("lease: WARNING: no gate from call 1 here and none on the command line: every fast path on")
    if gate.get("stop"):
        print(f"lease: STOP (call 1's gate): {gate['stop']}")
        return 3
    env.update(SUITE_OVERRIDES=" ".join([*gate["overrides"], *env.get("SUITE_OVERRIDES", "").split()]))
    env["LEASE_PEER"] = gate["peer"]
    print(f"lease: overrides: {env['SUITE_OVERRIDES'] or 'none'}; official run: {gate['peer']}")
    if call == "call3":
        env.setdefault("LIMIT_PROFILE", str(int(seconds * 2 / 5)))
    status = Suite(out).run(CALLS[call][1])
    if call == "call3":
        print("lease: done: give the machine back and commit what came back (docs/benchmarks.md)")
        return status
    if (details / "accuracy.md").exists():  # each side's linear top-1 and fastemp - official
        print((details / "accuracy.md").read_text())
    print(
        "lease: next: only if status shows >= 240 s of device time left: CALL_SECONDS=<budget_left_s - 40> bash "
        'benchmarks/gpu_suite.sh --lease call3 "$OUT"; else give the machine back and commit what came back '
        "(docs/benchmarks.md)"
    )
    return status
