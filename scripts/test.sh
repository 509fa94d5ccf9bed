#!/usr/bin/env bash
# The test command: set up what the tests need, then run ruff, mypy --strict and pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m 'not slow'
#                                     bash scripts/test.sh tests/unit/test_layering.py -x
set -eu
cd "$(dirname "$0")/.."
. scripts/_venv.sh

# Debian packages the tests use, as PACKAGE=COMMAND,... (see need_debs in scripts/_venv.sh).
# qemu-system-x86 boots the guests of tests/guest; the guests' own kernel and tools are fetched
# there with apt-get download. openssl makes the TLS tests' certificates. tests/deploy builds the
# container image (debootstrap makes its base, buildah builds, podman runs it with runc; those two
# live in /usr/sbin, so dpkg says whether they are there) and checks the systemd units. strace shows
# which lock bytes QEMU's tools take (tests/interop/test_lock_bytes_oracle.py); python3-seccomp makes a
# filesystem without OFD locks (tests/seccomp_nolock.py).
DEB_PACKAGES="qemu-utils=qemu-img,qemu-io,qemu-nbd libnbd-bin=nbdinfo,nbdsh,nbdcopy python3-libnbd
  nbd-client fio=fio qemu-system-x86=qemu-system-x86_64 e2fsprogs=debugfs,e2fsck openssl=openssl
  debootstrap buildah=buildah podman=podman runc
  systemd=systemd-analyze,systemd-socket-activate,systemd-sysusers strace=strace python3-seccomp"

# shellcheck disable=SC2086  # one word per package
need_debs $DEB_PACKAGES
make_venv
pip_install -e '.[test]'

lint_dirs=""
for d in qednbd tests bench deploy; do
    if [ -d "$d" ]; then lint_dirs="$lint_dirs $d"; fi
done
say "ruff check$lint_dirs"
# shellcheck disable=SC2086
"$VENV/bin/ruff" check $lint_dirs

say "mypy (strict, qednbd/)"
"$VENV/bin/mypy"

say "pytest $*"
rc=0
"$VENV/bin/python" -m pytest "$@" || rc=$?
if [ "$rc" = 5 ]; then
    die "pytest collected no tests (exit 5); a test run that runs nothing is a failure"
fi
exit "$rc"
