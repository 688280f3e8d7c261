#!/usr/bin/env bash
# Write the environment health report: runs `olmd verify-env` with the given arguments.
#
#   deploy/verify_env.sh                 this machine
#   deploy/verify_env.sh --node gpu-a    a node from the settings, over SSH
#
# Finds olmd as $OLMD_BIN, /opt/olmd/bin/olmd (bootstrap.sh's venv), or on PATH. The
# settings come from $OLMD_CONFIG, ./settings.toml or /etc/olmd/settings.toml. Exit 0 all
# checks pass (warnings included), 1 a check failed, 2 usage or settings error.
set -euo pipefail

if [[ -n "${OLMD_BIN:-}" ]]; then
    olmd=$OLMD_BIN
elif [[ -x /opt/olmd/bin/olmd ]]; then
    olmd=/opt/olmd/bin/olmd
elif command -v olmd >/dev/null; then
    olmd=$(command -v olmd)
else
    echo "verify_env: olmd not found; run deploy/bootstrap.sh or set OLMD_BIN" >&2
    exit 2
fi

exec "$olmd" verify-env "$@"
