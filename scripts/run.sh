#!/usr/bin/env bash
# Set up .venv, install qednbd, and serve a QED image over NBD (default nbd://127.0.0.1:10809):
#   bash scripts/run.sh                  # create demo.qed (1 GiB) if absent, then: qednbd serve demo.qed
#   bash scripts/run.sh FILE [OPTION...] # serve FILE (created, 1 GiB, if absent); options go to serve,
#                                        # e.g. -p 0 (any free port), -k SOCKET, -r, -x NAME
# Ctrl-C (or SIGTERM) stops the server cleanly. Try, from another shell:
#   nbdinfo nbd://127.0.0.1:10809      qemu-img info nbd://127.0.0.1:10809
set -eu
image=""
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
    case $1 in
        /*) image=$1 ;;
        *) image=$PWD/$1 ;;  # resolve before we change directory
    esac
    shift
fi
cd "$(dirname "$0")/.."
. scripts/_venv.sh

make_venv
pip_install -e .

if [ -z "$image" ]; then
    image=$PWD/demo.qed
fi
if [ ! -e "$image" ]; then
    say "qednbd create $image 1G"
    "$VENV/bin/qednbd" create "$image" 1G
fi
say "qednbd serve $* $image   (Ctrl-C stops it)"
exec "$VENV/bin/qednbd" serve "$@" "$image"
