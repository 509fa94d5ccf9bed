# Shared set-up for scripts/run.sh and scripts/test.sh. Source it from the repository root;
# it defines functions only and changes nothing by itself.
#
#   need_debs PKG[=CMD,CMD...] ...   install the Debian packages that are missing
#   make_venv                        create or reuse .venv (Python >= 3.11)
#   pip_install ARGS...              pip install into .venv
#
# Everything runs through .venv/bin/..., so nothing needs to be activated.

VENV=.venv
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, through password-less sudo otherwise.
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

_apt_updated=
apt_install() {
    command -v apt-get >/dev/null 2>&1 \
        || die "apt-get not found; install these packages by hand: $*"
    if [ "$(id -u)" != 0 ] && ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
        die "need root (or password-less sudo) to install: $*  -- run: sudo apt-get install -y $*"
    fi
    if [ -z "$_apt_updated" ]; then
        say "apt-get update"
        as_root apt-get update -qq >/dev/null || die "apt-get update failed"
        _apt_updated=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}

# need_debs qemu-utils=qemu-img,qemu-io other-pkg
# A package counts as present when every listed command is on PATH; with no commands
# listed, when dpkg says it is installed.
need_debs() {
    local spec pkg cmds cmd missing=""
    for spec in "$@"; do
        pkg=${spec%%=*}
        if [ "$pkg" != "$spec" ]; then
            cmds=${spec#*=}
            for cmd in ${cmds//,/ }; do
                if ! command -v "$cmd" >/dev/null 2>&1; then
                    missing="$missing $pkg"
                    break
                fi
            done
        elif ! dpkg -s "$pkg" >/dev/null 2>&1; then
            missing="$missing $pkg"
        fi
    done
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086  # word splitting of the package list is intended
        apt_install $missing
    fi
}

_venv_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

make_venv() {
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3.11 or newer"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); qednbd needs Python 3.11 or newer (set PYTHON=...)"
    if _venv_ok; then
        return 0
    fi
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's python3 ships without ensurepip; python3-venv brings it back.
        rm -rf "$VENV"
        as_root true || die "'$PYTHON -m venv' failed; install python3-venv (as root: apt-get install python3-venv)"
        apt_install python3-venv
        "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed even after installing python3-venv"
    fi
    _venv_ok || die "$VENV was created but has no working pip"
}

pip_install() {
    say "pip install $*"
    "$VENV/bin/python" -m pip install -q "$@" || die "pip install $* failed"
}
