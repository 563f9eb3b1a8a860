#!/usr/bin/env bash
# The accuracy lease (issue 21) in three device calls, each ending by itself within CALL_SECONDS (defaults 230 /
# 550 / 200) and publishing into OUT as it goes; benchmarks/suite.py's `lease` holds the plan and docs/benchmarks.md
# the exact `run` commands and the time estimate of each call.
#
#   benchmarks/lease.sh call1|call2|call3 OUT
exec bash "$(dirname "$0")/gpu_suite.sh" --lease "$@"
