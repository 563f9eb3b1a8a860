"""suite.json and suite.md for benchmarks/gpu_suite.sh: every part's status beside its numbers.

    python3 -m fastemp.benchmarks.suite_report --details OUT/details --out OUT

Reads the parts' records (details/parts.jsonl, one line per finished part, written by the shell, so
a part that crashed or was cut at its limit is still listed) and the parts' own result files, and
writes OUT/suite.json (statuses, limits, seconds, the environment) and OUT/suite.md (a status table,
then each part's markdown report in run order).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fastemp import runs

from . import common

# part -> the name of its result files
RESULT_NAMES = {
    "smoke": "smoke",
    "accuracy": "accuracy",
    "throughput20": "throughput_n20",
    "profile": "profile",
    "tune": "tuned_n20",
    "tune_modes": "tune_modes_n20",
    "throughput200": "throughput_n200",
    "kernels": "kernels",
    "tta": "time_to_85_n20",
    "data": "data",
}
# parts whose whole result goes inside suite.json: a file of their own would pass the 8-file limit
EMBEDDED = ("data",)


def read_parts(details: Path) -> list[dict]:
    """The latest record of each part, in the order the parts first ran."""
    parts: dict[str, dict] = {}
    path = details / "parts.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        parts[record["part"]] = record
    return list(parts.values())


def part_result(details: Path, part: str) -> dict | None:
    path = details / f"{RESULT_NAMES[part]}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summarize(details: Path) -> tuple[dict, str]:
    parts = read_parts(details)
    results = {p["part"]: part_result(details, p["part"]) for p in parts}
    environment = next((r["environment"] for r in results.values() if r and "environment" in r), {})
    rows, sections = [], []
    for p in parts:
        result = results[p["part"]]
        written = "none" if result is None else ("partial" if result.get("partial") else "complete")
        p.update(result_file=f"{RESULT_NAMES[p['part']]}.json" if result else None, result=written)
        if p["part"] in EMBEDDED:
            p.update(result_file="suite.json" if result else None, result_json=result)
        # the profile stays in details.tar.gz: its JSON is long and the folder holds at most 8 files
        rows.append([p["part"], p["status"], p["seconds"], p["limit_seconds"], written])
        md = details / f"{RESULT_NAMES[p['part']]}.md"
        if md.exists():
            sections.append(re.sub(r"^(#+) ", r"#\1 ", md.read_text().strip(), flags=re.M))  # one level down
    summary = {
        "benchmark": "gpu_suite",
        "created": common.now_iso(),
        "environment": environment,
        "dry_run": any(p.get("dry_run") for p in parts),
        "parts": parts,
    }
    lines = [
        f"# GPU suite: {common.device_label(environment) if environment else 'unknown device'}",
        "",
        "Parts in the order they ran; TIMEOUT means the part was cut at its limit and keeps what it had "
        "written (results marked partial).",
        "",
        common.markdown_table(["part", "status", "seconds", "limit s", "results"], rows),
        "",
    ]
    if summary["dry_run"]:
        lines += ["**Dry run** (SUITE_DRY_RUN=1): CPU, toy sizes. These numbers measure nothing.", ""]
    lines += [s + "\n" for s in sections]
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m fastemp.benchmarks.suite_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--details", required=True, help="the suite's details folder")
    parser.add_argument("--out", required=True, help="where suite.json and suite.md go")
    args = parser.parse_args(argv)
    summary, markdown = summarize(Path(args.details))
    out = Path(args.out)
    runs.write_json(out / "suite.json", summary)
    (out / "suite.md").write_text(markdown.rstrip() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
