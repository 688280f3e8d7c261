#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host for olmd. Safe to run again: every step checks first.
#
#   1. system user and group "olmd" (home /var/lib/olmd, no login shell)
#   2. a virtual environment in /opt/olmd with olmd installed (pip install --upgrade)
#   3. /etc/olmd/settings.toml from the repository's settings.toml, with the manifest and
#      the health report in /var/lib/olmd; an existing file is never overwritten
#   4. /etc/olmd/olmd.env from systemd/olmd.env.example, mode 0600, kept if present
#   5. /etc/systemd/system/olmd.service, enabled and started (restarted when the unit or
#      the installed olmd version changed)
#   6. olmd healthcheck against the configured Ollama nodes
#
# --root DIR stages the files under DIR (no user, no systemctl start, no healthcheck) so
# the script can be checked without touching the machine; --dry-run only prints.
set -euo pipefail

PREFIX=/opt/olmd
ETC_DIR=/etc/olmd
STATE_DIR=/var/lib/olmd
UNIT_DIR=/etc/systemd/system
UNIT=olmd.service
SERVICE_USER=olmd

usage() {
    cat <<EOF
Usage: $(basename "$0") [--root DIR] [--dry-run] [--no-venv] [--no-start]
                    [--package SPEC] [--python PATH]

  --root DIR      install into the staging tree DIR instead of /
  --dry-run       print the steps, change nothing
  --no-venv       skip the virtual environment and pip (the files only)
  --no-start      install and enable the unit, but neither start it nor run the healthcheck
  --package SPEC  what pip installs (default: this repository, $SOURCE_DIR)
  --python PATH   Python 3.11 or newer for the venv (default: the first found)
EOF
}

SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=""
DRY_RUN=0
NO_VENV=0
NO_START=0
PACKAGE=""
PYTHON=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-venv) NO_VENV=1; shift ;;
        --no-start) NO_START=1; shift ;;
        --package) PACKAGE=${2:?--package needs a pip requirement}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bootstrap: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
PACKAGE=${PACKAGE:-$SOURCE_DIR}
if [[ -n "$ROOT" ]]; then
    [[ "$DRY_RUN" == 1 ]] || mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" 2>/dev/null && pwd || echo "$ROOT")
    NO_START=1
fi

step() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '    would run: %s\n' "$*"
    else
        "$@"
    fi
}

for file in settings.toml systemd/olmd.service systemd/olmd.env.example; do
    if [[ ! -f "$SOURCE_DIR/$file" ]]; then
        echo "bootstrap: $SOURCE_DIR/$file is missing; run the script from an olmd checkout" >&2
        exit 2
    fi
done
if [[ -z "$ROOT" && "$DRY_RUN" == 0 && $EUID -ne 0 ]]; then
    echo "bootstrap: run as root (or use --root DIR / --dry-run)" >&2
    exit 2
fi

# 1. user ---------------------------------------------------------------------------------
step "system user $SERVICE_USER"
if [[ -n "$ROOT" ]]; then
    note "skipped in a staging root"
elif getent passwd "$SERVICE_USER" >/dev/null; then
    note "exists"
else
    run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "olmd, the Ollama fleet daemon" "$SERVICE_USER"
fi

# 2. virtual environment --------------------------------------------------------------------
find_python() {
    local candidate
    for candidate in "$PYTHON" python3.13 python3.12 python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

OLD_VERSION=""
NEW_VERSION=""
step "virtual environment $PREFIX"
if [[ "$NO_VENV" == 1 ]]; then
    note "skipped (--no-venv)"
else
    VENV="$ROOT$PREFIX"
    if ! python=$(find_python); then
        echo "bootstrap: olmd needs Python 3.11 or newer; on Ubuntu 22.04:" \
            "apt-get install python3.11 python3.11-venv, then --python python3.11" >&2
        exit 1
    fi
    if [[ -x "$VENV/bin/python" ]]; then
        note "exists"
        OLD_VERSION=$("$VENV/bin/olmd" --version 2>/dev/null || true)
    else
        if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
            # Debian and Ubuntu split venv support out of the interpreter package.
            venv_package="python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
            if [[ -n "$ROOT" ]]; then
                echo "bootstrap: $python lacks venv support; apt-get install $venv_package" >&2
                exit 1
            fi
            run apt-get install -y "$venv_package"
        fi
        run "$python" -m venv "$VENV"
        run "$VENV/bin/pip" install --quiet --upgrade pip
    fi
    run "$VENV/bin/pip" install --quiet --upgrade "$PACKAGE"
    if [[ "$DRY_RUN" == 0 ]]; then
        NEW_VERSION=$("$VENV/bin/olmd" --version)
        note "installed: $NEW_VERSION"
    fi
fi

# 3. settings -------------------------------------------------------------------------------
step "settings $ETC_DIR/settings.toml"
run install -d -m 0755 "$ROOT$ETC_DIR"
SETTINGS="$ROOT$ETC_DIR/settings.toml"
if [[ -e "$SETTINGS" ]]; then
    note "kept (exists; compare with $SOURCE_DIR/settings.toml for new keys)"
elif [[ "$DRY_RUN" == 1 ]]; then
    note "would write it from $SOURCE_DIR/settings.toml, manifest and report in $STATE_DIR"
else
    staged=$(mktemp "$ROOT$ETC_DIR/.settings.toml.XXXXXX")
    trap 'rm -f "$staged"' EXIT
    # The daemon may write only below its StateDirectory (ProtectSystem=strict).
    sed -E \
        -e "s|^(manifest_path[[:space:]]*=[[:space:]]*)\"[^\"]*\"|\\1\"$STATE_DIR/ollama-models-manifest.json\"|" \
        -e "s|^(path[[:space:]]*=[[:space:]]*)\"docs/deployment/ollama-health-report.md\"|\\1\"$STATE_DIR/ollama-health-report.md\"|" \
        "$SOURCE_DIR/settings.toml" >"$staged"
    for expected in "manifest_path = \"$STATE_DIR/" "path = \"$STATE_DIR/ollama-health-report.md\""; do
        if ! grep -q "^$expected" "$staged"; then
            echo "bootstrap: could not set '$expected...' in settings.toml; its layout changed" >&2
            exit 1
        fi
    done
    chmod 0644 "$staged"
    mv "$staged" "$SETTINGS"
    trap - EXIT
    note "written"
fi

# 4. secrets --------------------------------------------------------------------------------
step "secrets $ETC_DIR/olmd.env (mode 0600)"
ENV_FILE="$ROOT$ETC_DIR/olmd.env"
if [[ -e "$ENV_FILE" ]]; then
    note "kept (exists)"
    run chmod 0600 "$ENV_FILE"
else
    run install -m 0600 "$SOURCE_DIR/systemd/olmd.env.example" "$ENV_FILE"
    [[ "$DRY_RUN" == 1 ]] || note "written from olmd.env.example: fill in the secrets"
fi

# 5. unit -----------------------------------------------------------------------------------
step "unit $UNIT_DIR/$UNIT"
UNIT_CHANGED=0
run install -d -m 0755 "$ROOT$UNIT_DIR"
if cmp -s "$SOURCE_DIR/systemd/$UNIT" "$ROOT$UNIT_DIR/$UNIT"; then
    note "unchanged"
else
    UNIT_CHANGED=1
    run install -m 0644 "$SOURCE_DIR/systemd/$UNIT" "$ROOT$UNIT_DIR/$UNIT"
    [[ "$DRY_RUN" == 1 ]] || note "installed"
fi
if [[ -n "$ROOT" ]]; then
    # What `systemctl enable` does for WantedBy=multi-user.target, without a manager.
    run install -d -m 0755 "$ROOT$UNIT_DIR/multi-user.target.wants"
    run ln -sfn "$UNIT_DIR/$UNIT" "$ROOT$UNIT_DIR/multi-user.target.wants/$UNIT"
else
    [[ "$UNIT_CHANGED" == 0 ]] || run systemctl daemon-reload
    run systemctl enable "$UNIT"
fi

if [[ "$NO_START" == 1 ]]; then
    step "start and healthcheck"
    note "skipped${ROOT:+ in a staging root}"
    exit 0
fi

# 6. start and check ------------------------------------------------------------------------
step "start $UNIT"
if systemctl is-active --quiet "$UNIT"; then
    if [[ "$UNIT_CHANGED" == 1 || "$OLD_VERSION" != "$NEW_VERSION" ]]; then
        # A new unit or a new olmd needs a restart; SIGTERM drains in-flight streams first.
        run systemctl restart "$UNIT"
    else
        note "running"
    fi
else
    # Type=notify: this returns once olmd has probed the nodes and says READY=1.
    run systemctl start "$UNIT"
fi

step "healthcheck"
if [[ "$DRY_RUN" == 1 ]]; then
    note "would run: $PREFIX/bin/olmd healthcheck (with $ETC_DIR/olmd.env loaded)"
    exit 0
fi
if (
    set -a
    # shellcheck disable=SC1090 # the operator's file, written from olmd.env.example
    . "$ENV_FILE"
    set +a
    exec "$PREFIX/bin/olmd" --config "$SETTINGS" healthcheck
); then
    note "olmd is installed and running; see: systemctl status olmd, journalctl -u olmd"
else
    echo "bootstrap: olmd is installed and running, but the healthcheck failed:" \
        "check services.ollama in $SETTINGS and that Ollama listens there" >&2
    exit 1
fi
