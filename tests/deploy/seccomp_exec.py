"""Run a command under the seccomp part of a systemd unit's sandbox (a test helper script).

    python3 seccomp_exec.py [--allow @GROUP|NAME]... [--deny @GROUP|NAME]... [--mdwe] -- CMD...

Runs under Debian's system Python with python3-seccomp, not the project's venv. Follows
systemd.exec(5): the allow list (SystemCallFilter=) and deny list (SystemCallFilter=~...)
expanded by `systemd-analyze syscall-filter`, other calls failing with EPERM
(SystemCallErrorNumber=EPERM); with --mdwe, MemoryDenyWriteExecute=yes: no mapping both
writable and executable, no mprotect adding PROT_EXEC, no shmat with SHM_EXEC.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import subprocess
import sys

import seccomp  # Debian: python3-seccomp

SHM_EXEC = 0o100000


def expand(name: str) -> set[str]:
    """A system call, or the calls of a systemd group (@name), nested groups included."""
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            calls |= expand(line)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--allow", action="append", default=[])
    parser.add_argument("--deny", action="append", default=[])
    parser.add_argument("--mdwe", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    allowed: set[str] = set().union(*map(expand, args.allow))
    allowed -= set().union(*map(expand, args.deny))
    allow_list = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    known = 0
    for name in sorted(allowed):
        try:
            allow_list.add_rule(seccomp.ALLOW, name)
            known += 1
        except (RuntimeError, ValueError):
            pass  # a call this architecture does not have
    if args.mdwe:
        # Loaded first: the allow list may not leave seccomp(2) itself allowed.
        write_exec = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        both = mmap.PROT_WRITE | mmap.PROT_EXEC
        refuse = seccomp.ERRNO(errno.EPERM)
        write_exec.add_rule(refuse, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, both, both))
        for call in ("mprotect", "pkey_mprotect"):
            exec_bit = mmap.PROT_EXEC
            write_exec.add_rule(refuse, call, seccomp.Arg(2, seccomp.MASKED_EQ, exec_bit, exec_bit))
        write_exec.add_rule(refuse, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        write_exec.load()
    allow_list.load()
    print(f"seccomp_exec: {known} calls allowed, mdwe={args.mdwe}", file=sys.stderr, flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
