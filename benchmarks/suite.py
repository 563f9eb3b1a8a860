"""The GPU suite (benchmarks/gpu_suite.sh [all|PART,...] [OUT]) and the accuracy lease (benchmarks/gpu_suite.sh
--lease call1|call2|call3 OUT): `python -m fastemp.benchmarks.suite [all|PART,...] [OUT]` or `... --lease CALL OUT`.

A part is a list of commands, each in its own process group within the part's limit (LIMIT_<PART>, cut to what is
left before SUITE_DEADLINE); a part cut at its limit is TIMEOUT and keeps what it wrote, and the next part runs. OUT
(default benchmarks/results/<device>) is published after every part and every 30 s: up to 5 part JSONs, suite.json,
suite.md, details.tar.gz. SUITE_DRY_RUN=1: the CPU at toy sizes. docs/benchmarks.md has the rest.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fastemp import runs

from .harness import Wall, now_iso
from .report import device_label, read_result, table
from .smoke import ITEMS as SMOKE_LIMITS
from .smoke import lease, write_record

PARTS = tuple("smoke accuracy throughput20 profile tune tune_modes throughput200 kernels tta data".split())
LIMITS = dict(smoke=540, accuracy=570, throughput20=420, profile=180, tune=540, tune_modes=600, throughput200=480)
LIMITS.update(kernels=240, tta=420, data=540)
PUBLISHED = ("smoke", "accuracy", "official_peer", "throughput_n20", "throughput_n200", "time_to_85_n20", "kernels")
RESULT = dict(throughput20="throughput_n20", tune="tuned_n20", tune_modes="tune_modes_n20", tta="time_to_85_n20")
RESULT["throughput200"] = "throughput_n200"
TOY = "data.source=synthetic data.synthetic_train=96 data.synthetic_test=48"
SIZES = "model.width=8 model.hidden_dim=32 model.z_dim=16 model.compile=none train.n_patches=4 train.batch_size=16 "
SIZES += "eval.patches=2 eval.probe_epochs=2 eval.probe_batch_size=16 eval.batch_size=16"  # a dry run's, everywhere
TUNE_TOY = "--batch 16 --compile none --cudnn-benchmark off --patch-compile off --warmup 0 --steps 1"
# part: (its command on the GPU, what a dry run appends: a later option or key wins); {data}: 5,000 synthetic images
# (throughput does not depend on image content) or TOY, {jpeg}: the CIFAR-10 JPEG copy or TOY (in a dry run, + SIZES)
COMMANDS = {
    "throughput20": (
        "bench throughput --config cifar10_n20_1ep {data} --n 20 --batch 100 --backend torch --baseline",
        "--n 4 --batch 16 --steps 2 --warmup 0 --split-steps 1 --baseline-workers 0 --baseline-steps 2 --peak-size 64",
    ),
    "throughput200": (  # 0 chunks: one pass with ghost BatchNorm; 10: the gradient cache, the same groups, gradients
        "bench throughput --config cifar10_n200_1ep {data} --n 200 --batch 100 --grad-chunks 0,10 --backend torch "
        "--steps 10 --split-steps 5",
        "--n 8 --batch 16 --grad-chunks 0,2 --steps 2 --warmup 0 --split-steps 1 --peak-size 64 train.bn_groups=2",
    ),
    "profile": (
        "bench profile --config cifar10_n20_1ep {data}",
        "--warmup 0 --steps 2",
    ),
    "tune": (
        "tune --config cifar10_n20_1ep {data} --batch 100 --backend torch --warmup 3 --steps 10 --compile default "
        "--cudnn-benchmark off,on --patch-compile off,on",
        TUNE_TOY,
    ),
    "tune_modes": (
        "tune --config cifar10_n20_1ep {data} --batch 100 --backend torch --warmup 3 --steps 10 --compile "
        "default,reduce-overhead,max-autotune-no-cudagraphs --cudnn-benchmark on --patch-compile on",
        TUNE_TOY,
    ),
    "kernels": (
        "bench kernels",
        "--n 4 --batch 16 --dim 32 --width 4 --warmup 0 --iters 2 --no-compile --images 64 --baseline-aug-patches 4",
    ),
    "tta": (  # time to 85%; short of it, the best accuracy and the times to 70/75/80%
        "bench time-to-accuracy --config cifar10_n20_10ep {jpeg} train.epochs=3 eval.knn=false --protocol cheap "
        "--target 0.85 --milestones 0.70,0.75,0.80 --eval-every 250 --max-wall-seconds {wall}",
        "train.epochs=2",
    ),
    "data": (
        "bench data {overrides}",  # its defaults: 32, 64 and 400 px sources, n=20, B=100, min(16, cores) workers
        "--sources 24 --patch 16 --n 2 --batch 4 --workers 0 --warmup 0 --steps 1 --classes 2 --per-class 2 "
        "model.width=8 model.hidden_dim=16 model.z_dim=8",
    ),
}


class Step(NamedTuple):
    """A command of a part: its own limit (cut to what is left of the part), and what to do when that limit cuts it
    (then the part goes on)."""

    argv: list[str]
    limit: float | None = None
    cut: Callable | None = None


class Suite:
    def __init__(self, out: str | None):
        env = os.environ
        self.dry = env.get("SUITE_DRY_RUN") == "1"
        self.slug = "cpu-dry-run" if self.dry else device_slug()
        self.out = Path(out or f"benchmarks/results/{self.slug}")
        self.details = Path(env.get("SUITE_DETAILS") or self.out / "details")
        self.details.mkdir(parents=True, exist_ok=True)
        # a dry run reads only the copy it is given (a tiny one)
        places = [env.get("FASTEMP_CIFAR10_JPEG", ""), *[".data", "shared/data", "../shared/data"] * (not self.dry)]
        places = [p if p.endswith(".gz") else f"{p}/cifar10-jpeg.tar.gz" for p in places if p]
        self.jpeg = next((str(Path(p).resolve()) for p in places if Path(p).is_file()), "")
        self.official = env.get("FASTEMP_OFFICIAL_DIR") or ("" if self.dry else str(Path(".official").resolve()))
        self.overrides = env.get("SUITE_OVERRIDES", "")
        self.tail = ["--device", "cpu" if self.dry else "cuda", "--force"]
        if self.dry:
            env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        env.update(FASTEMP_OFFICIAL_DIR=self.official, FASTEMP_CIFAR10_JPEG=self.jpeg, PIP_NO_INDEX="1")
        env.update(FASTEMP_OFFICIAL_PYTHON=env.get("FASTEMP_OFFICIAL_PYTHON") or sys.executable, PYTHONUNBUFFERED="1")
        self.part_end, self.failed = 0.0, False

    def left(self) -> float:
        return self.part_end - time.monotonic()

    def fail(self, why: str) -> None:
        print(f"gpu_suite: {why}")
        self.failed = True

    def fastemp(self, command: str, *extra: str, **words) -> Step:
        """`python -m fastemp COMMAND EXTRA...`, the command's {words} filled in."""
        data = f"{TOY} {SIZES}" if self.dry else "data.source=synthetic data.synthetic_train=5000"
        jpeg = f"{TOY} {SIZES}" if self.dry else f"data.source=imagefolder data.path={self.jpeg}"
        words = dict(data=f"{data} {self.overrides}", jpeg=f"{jpeg} {self.overrides}", out=self.details) | words
        return Step(
            [sys.executable, "-m", "fastemp", *shlex.split(command.format(overrides=self.overrides, **words)), *extra]
        )

    def steps(self, part: str):
        if part in ("tta", "accuracy") and not self.dry and not self.jpeg:
            self.fail(f"{part} needs the CIFAR-10 JPEG archive (FASTEMP_CIFAR10_JPEG); none was found")
            return []
        if part in ("smoke", "accuracy"):
            return getattr(self, part)()
        name, (command, toy) = RESULT.get(part, part), COMMANDS[part]
        out = [f"{self.details}/{name}.yaml"] if part.startswith("tune") else [str(self.details), "--name", name]
        return [
            self.fastemp(command, "--out", *out, *self.tail, *shlex.split(toy) * self.dry, wall=int(self.left() - 30))
        ]

    def smoke(self):
        """Every item in its own process under its own limit (LIMIT_SMOKE_<ITEM>), cut to what is left of the part
        less 20 s; then the report and its gate, which always runs (an item left out is SKIP; a failed item fails the
        part through the report)."""
        record, items = self.details / "smoke.jsonl", os.environ.get("SMOKE_ITEMS", ",".join(SMOKE_LIMITS)).split(",")
        record.unlink(missing_ok=True)
        module = [sys.executable, "-m", "fastemp.benchmarks.smoke"]

        for item in items:
            var = f"LIMIT_SMOKE_{item.upper()}"
            limit, left = float(os.environ.get(var) or SMOKE_LIMITS.get(item, 120)), self.left() - 20
            if left < 10:
                write_record(record, item, "SKIP", "no time left in the part")
                continue
            var, limit = (var, limit) if limit <= left else ("what was left of the part", left)
            cut = functools.partial(write_record, record, item, "FAIL", f"timed out after {limit:.0f} s ({var})", limit)
            run = [*module, "run", item, "--record", str(record), *["--dry-run"] * self.dry]
            yield Step(run, limit, cut)
        yield Step([*module, "report", "--record", str(record), "--out", str(self.details), "--items", ",".join(items)])

    def accuracy(self):
        """c10_n20_official_1ep@1 under the official protocol on the CIFAR-10 JPEG copy: the next seed, the official
        code's own run (the same data, evaluator and overrides), then the next seeds if they fit; the official run
        first while no official run in the history has passed. One accuracy.json holds every seed and official run
        so far (ACCURACY_HISTORY). FAIL unless the official run passed."""
        history = Path(os.environ.get("ACCURACY_HISTORY") or f"benchmarks/results/{self.slug}/accuracy.json")
        target = self.details / "accuracy.json"
        if not target.exists() and history.is_file():
            shutil.copy(history, target)
            print(f"gpu_suite: adding to {history}")
        data = (f"--cifar10 {self.jpeg}" if self.jpeg else TOY) + f" {SIZES}" * self.dry
        count = os.environ.get("ACCURACY_SEEDS", "2")  # a count of new seeds, or a list ("3," is the seed 3)
        if "," in count:
            first, *later = [f"{s}," for s in count.split(",") if s]
            later = "".join(later)
        else:
            first, later = "next:1", f"next:{int(count) - 1}" if int(count) > 1 else ""
        passed = [r for r in (read_result(target) or {}).get("official_runs", []) if r.get("status") == "PASS"]
        for which in (first, "peer", later) if passed else ("peer", first, later):  # fastemp - official needs one
            if which == "peer":
                yield from self.peer(target)
            elif which and self.left() < 80:
                print(f"gpu_suite: seeds {which} not run: only {self.left():.0f} s left of the part")
            elif which:
                command = "bench accuracy --rows c10_n20_official_1ep@1 --seeds {which} --budget {budget} {data} "
                command += "{overrides} --accumulate --out {out} --name accuracy"
                yield self.fastemp(command, *self.tail, which=which, budget=int(self.left() - 20), data=data)

    def peer(self, target: Path):
        peer = self.details / "official_peer.json"
        peer.unlink(missing_ok=True)
        lease = os.environ.get("LEASE_PEER", "run")
        checkout = Path(self.official or "/-", "main.py").is_file()
        skip = [lease[6:] if lease.startswith("skip") else ""]
        skip += ["" if checkout else f"no checkout of tsb0601/EMP-SSL at {self.official or '.official/'}"]
        skip += ["" if self.jpeg else "no CIFAR-10 JPEG archive", "" if self.left() > 80 else "too little time left"]
        reason = next((r for r in skip if r), None)
        if reason:
            peer.write_text(json.dumps({"benchmark": "official_peer", "status": "SKIP", "reason": reason}) + "\n")
            print(f"gpu_suite: official peer SKIP: {reason}")
            self.failed |= not (self.dry and not self.official)  # a dry run without a checkout has nothing to run
            return
        command = "bench official-peer --official-dir {official} --data {jpeg_file} --python {python} --out {out} "
        command += "--accuracy {target} --time-limit {limit} {size} {overrides}"
        size = f"--cpu-dry-run --n 4 --train-images 200 --test-images 40 {SIZES}" if self.dry else "--n 20"
        words = dict(official=self.official, jpeg_file=self.jpeg, python=os.environ["FASTEMP_OFFICIAL_PYTHON"])
        yield self.fastemp(command, target=target, limit=int(self.left() - 20), size=size, **words)
        if (read_result(peer) or {}).get("status") != "PASS":  # none: it died before it could write one (its log)
            self.fail("official run FAILED: see official_peer.json/.log")

    # ------------------------------------------------------------------------------ running and publishing

    def run_step(self, step: Step, log) -> int:
        """The command in its own process group until it ends or its limit (then TERM, 15 s later KILL: 124),
        publishing every 30 s meanwhile."""
        limit = min(step.limit or self.left(), self.left())
        log.write(f"$ {shlex.join(step.argv)}\n")
        log.flush()
        popen = dict(stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        child, end = subprocess.Popen(step.argv, **popen), time.monotonic() + limit
        while time.monotonic() < end:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=min(30, end - time.monotonic()))
            self.publish()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if child.poll() is None:
                os.killpg(child.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=15)
        if step.cut and self.left() > 5:
            step.cut()
            return 0
        return 124

    def run_part(self, part: str) -> str:
        status = "PASS"
        with open(self.details / f"{part}.log", "w") as log:
            for step in self.steps(part):
                rc = self.run_step(step, log) if self.left() > 1 else 124
                if rc == 124:
                    return "TIMEOUT"
                status = "FAIL" if rc else status
        return "FAIL" if self.failed else status

    def run(self, parts: list[str]) -> int:
        def say(text: str) -> None:
            print(f"gpu_suite: {text}", flush=True)
            with open(self.details / "suite.log", "a") as f:
                f.write(f"gpu_suite: {text}\n")

        say(f"parts {','.join(parts)} on {self.slug}, writing into {self.out}")
        tools = (("nvidia-smi", ["nvidia-smi"]), ("pip-freeze", [sys.executable, "-m", "pip", "freeze"]))
        for name, argv in () if self.dry else tools:
            try:
                text = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.SubprocessError) as err:
                text = f"{name} failed: {err}"
            (self.details / f"{name}.txt").write_text(text)
        failed = False
        for part in parts:
            limit = float(os.environ.get(f"LIMIT_{part.upper()}") or (240 if self.dry else LIMITS[part]))
            left = float(os.environ.get("SUITE_DEADLINE") or "inf") - time.time() - 25  # 25 s to stop and publish
            limit, starts = min(limit, left), left >= 10
            wall, self.part_end, self.failed = Wall(), time.monotonic() + limit, False
            say(f"part {part}: " + (f"start (limit {limit:.0f} s)" if starts else "no time left before SUITE_DEADLINE"))
            verdict = self.run_part(part) if starts else "SKIP"
            seconds = round(wall.lap())
            log = (self.details / f"{part}.log").read_text().splitlines() if starts else []
            shown = [line for line in log if re.match(r"(smoke|gpu_suite:|step |accuracy |fastemp|wrote )", line)]
            print("\n".join(shown[-40:] + log[-5:] * (verdict == "FAIL")))
            say(f"part {part}: {verdict} in {seconds} s of {max(0, limit):.0f} s")
            record = {"part": part, "status": verdict, "seconds": seconds, "limit_seconds": round(max(0, limit))}
            runs.append_line(self.details / "parts.jsonl", {**record, "dry_run": self.dry})
            failed |= verdict != "PASS"
            self.publish()
        say(f"done: {' '.join(sorted(p.name for p in self.out.iterdir()))}")
        return int(failed)

    def publish(self) -> None:
        """OUT: up to 5 part JSONs, suite.json (every part's status, limit, seconds, result), suite.md (the same, then
        each part's own report) and details.tar.gz (at most 8 files), each replaced whole."""
        self.out.mkdir(parents=True, exist_ok=True)
        present = [name for name in PUBLISHED if (self.details / f"{name}.json").exists()]
        for i, name in enumerate(present):
            (self.out / f"{name}.json").unlink(missing_ok=True)
            if i < 5:
                shutil.copy(self.details / f"{name}.json", self.out / f"{name}.json")
        parts = {r["part"]: r for r in runs.read_lines(self.details / "parts.jsonl")}
        sections, environment = [], {}
        for p in parts.values():
            name = RESULT.get(p["part"], p["part"])
            result = read_result(self.details / f"{name}.json") or None
            environment = environment or (result or {}).get("environment") or {}
            p["result"] = "none" if result is None else "partial" if result.get("partial") else "complete"
            p["result_file"] = None if result is None else "suite.json" if p["part"] == "data" else f"{name}.json"
            if p["part"] == "data" and result:  # its own file would be a 9th
                p["result_json"] = result
            if (self.details / f"{name}.md").exists():
                sections.append(re.sub(r"^(#+) ", r"#\1 ", (self.details / f"{name}.md").read_text(), flags=re.M))
        summary = {"benchmark": "gpu_suite", "created": now_iso(), "environment": environment, "dry_run": self.dry}
        runs.write_json(self.out / "suite.json", {**summary, "parts": list(parts.values())})
        lines = [f"# GPU suite: {device_label(environment) if environment else 'unknown device'}", ""]
        lines += ["Parts in the order they ran; TIMEOUT: cut at its limit, keeping what it had written (partial).", ""]
        lines += [
            table(parts.values(), "part status seconds limit_seconds result", "part|status|seconds|limit s|results")
        ]
        lines += ["", "**Dry run** (SUITE_DRY_RUN=1): CPU, toy sizes. These numbers measure nothing."] * self.dry
        (self.out / "suite.md").write_text("\n".join([*lines, "", *sections]))
        with tarfile.open(self.out / "details.tar.gz.tmp", "w:gz") as tar:
            for path in sorted(self.details.iterdir()):
                if path.name not in [f"{n}.json" for n in present[:5]]:
                    tar.add(path, arcname=f"./{path.name}")
        os.replace(self.out / "details.tar.gz.tmp", self.out / "details.tar.gz")


def device_slug() -> str:
    """The results folder of this machine's GPU, asked in a child process (the suite itself never starts CUDA)."""
    code = "import torch; from fastemp import runs; from fastemp.benchmarks.harness import device_slug as s; "
    code += "print(s(runs.environment(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))))"
    try:
        found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found.strip() or "unknown-device"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--lease"]:
        if len(argv) != 3 or argv[1] not in ("call1", "call2", "call3"):
            print("usage: benchmarks/gpu_suite.sh --lease call1|call2|call3 OUT", file=sys.stderr)
            return 2
        return lease(argv[1], str(Path(argv[2]).resolve()))
    parts = PARTS if argv[:1] in ([], ["all"]) else argv[0].split(",")
    if len(argv) > 2 or any(p not in PARTS for p in parts):
        print(f"usage: benchmarks/gpu_suite.sh [all|{','.join(PARTS)}] [OUT_DIR]", file=sys.stderr)
        return 2
    return Suite(argv[1] if len(argv) > 1 else None).run(list(parts))


if __name__ == "__main__":
    sys.exit(main())
