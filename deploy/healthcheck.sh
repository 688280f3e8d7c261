#!/usr/bin/env bash
# Check one Ollama node with curl alone (for hosts without olmd): GET /api/version and
# /api/tags, print the version and the models. Exit 0 healthy, 1 not, 2 usage.
#
#   deploy/healthcheck.sh [--host HOST] [--port PORT] [--scheme http|https] [--timeout S]
#
# Defaults: $OLLAMA_REMOTE_HOST or 127.0.0.1, $OLLAMA_REMOTE_PORT or 11434, 10 s.
# With olmd installed, `olmd healthcheck` checks every configured node at once.
set -euo pipefail

HOST=${OLLAMA_REMOTE_HOST:-127.0.0.1}
PORT=${OLLAMA_REMOTE_PORT:-11434}
SCHEME=http
TIMEOUT=10

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) HOST=${2:?--host needs a value}; shift 2 ;;
        --port) PORT=${2:?--port needs a value}; shift 2 ;;
        --scheme) SCHEME=${2:?--scheme needs a value}; shift 2 ;;
        --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "healthcheck: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [[ "$SCHEME" != http && "$SCHEME" != https ]]; then
    echo "healthcheck: --port must be a number and --scheme http or https" >&2
    exit 2
fi
command -v curl >/dev/null || { echo "healthcheck: curl is not installed" >&2; exit 2; }

if [[ "$HOST" == *:* && "$HOST" != \[* ]]; then
    HOST="[$HOST]" # an IPv6 address
fi
BASE="$SCHEME://$HOST:$PORT"

fetch() {
    curl --silent --show-error --fail --max-time "$TIMEOUT" --globoff "$BASE$1"
}

if ! version_json=$(fetch /api/version 2>&1); then
    echo "FAIL  $BASE  /api/version: $version_json"
    exit 1
fi
if ! tags_json=$(fetch /api/tags 2>&1); then
    echo "FAIL  $BASE  /api/tags: $tags_json"
    exit 1
fi

# Ollama writes compact JSON; pick the fields without jq.
version=$(printf '%s' "$version_json" | grep -o '"version":"[^"]*"' | head -n 1 | cut -d'"' -f4 || true)
models=$(printf '%s' "$tags_json" | grep -o '"name":"[^"]*"' | cut -d'"' -f4 || true)
count=$(printf '%s' "$models" | grep -c . || true)

echo "OK    $BASE  ollama ${version:-unknown}  $count model(s)"
if [[ -n "$models" ]]; then
    printf '%s\n' "$models" | sed 's/^/      /'
fi
