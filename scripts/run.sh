#!/usr/bin/env bash
# Set up .venv, install qednbd, and show an image:
#   bash scripts/run.sh            # create demo.qed (1 GiB) if absent, then: qednbd info demo.qed
#   bash scripts/run.sh FILE       # qednbd info FILE
set -eu
if [ $# -gt 1 ]; then
    echo "usage: bash scripts/run.sh [IMAGE]" >&2
    exit 2
fi
image=""
if [ $# -eq 1 ]; then
    case $1 in
        /*) image=$1 ;;
        *) image=$PWD/$1 ;;  # resolve before we change directory
    esac
fi
cd "$(dirname "$0")/.."
. scripts/_venv.sh

make_venv
pip_install -e .

if [ -z "$image" ]; then
    image=demo.qed
    if [ ! -e "$image" ]; then
        say "qednbd create $image 1G"
        "$VENV/bin/qednbd" create "$image" 1G
    fi
fi
say "qednbd info $image"
exec "$VENV/bin/qednbd" info "$image"
