"""Run a command on a "filesystem" without OFD locks: ``fcntl(F_OFD_*)`` fails with an errno.

Usage (Debian's python3, which has the libseccomp binding ``seccomp`` from python3-seccomp)::

    /usr/bin/python3 tests/seccomp_nolock.py ENOLCK COMMAND [ARG...]

A seccomp filter, inherited across exec, makes every F_OFD_GETLK/SETLK/SETLKW fail with the
given errno, as NFS without a lock manager (ENOLCK) or a kernel before 3.15 (EINVAL) answers;
everything else runs untouched. No code of the command is changed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys

import seccomp  # type: ignore[import-not-found]


def main() -> None:
    code = getattr(errno, sys.argv[1])
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for command in (fcntl.F_OFD_GETLK, fcntl.F_OFD_SETLK, fcntl.F_OFD_SETLKW):
        rules.add_rule(seccomp.ERRNO(code), "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    rules.load()
    os.execvp(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
