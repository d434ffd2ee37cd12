"""DeepSpeed hostfiles (`worker-1 slots=8`, MPI style), parsed with line-numbered errors.

DeepSpeed's own parser (deepspeed.launcher.runner._parse_hostfile) logs the whole file and raises a
ValueError without a line number, and accepts `slots=0`; on a 32-node hostfile the user wants to
know WHICH line is wrong before pdsh starts 256 processes. The accepted format is the same:
one `HOST slots=N` per line, `#` comments (whole-line or trailing), blank lines ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from spoxl.errors import SpoxlError

_LINE = re.compile(r"^(?P<host>[^\s#=]+)\s+slots\s*=\s*(?P<slots>\S+)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # GPUs (ranks) on this host


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts in file order; any malformed line -> SpoxlError naming `source:line`."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise SpoxlError(f"{source}:{number}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots_text = match.group("host"), match.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise SpoxlError(f"{source}:{number}: slots must be a positive integer, got {slots_text!r}")
        if host in seen:
            raise SpoxlError(f"{source}:{number}: host {host!r} is already listed on line {seen[host]}")
        seen[host] = number
        hosts.append(Host(host, int(slots_text)))
    if not hosts:
        raise SpoxlError(f"{source}: no hosts listed (expected lines like 'worker-1 slots=8')")
    return hosts


def parse_hostfile(path: str | Path) -> list[Host]:
    path = Path(path)
    if not path.is_file():
        raise SpoxlError(f"hostfile {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpoxlError(f"hostfile {str(path)!r} is not UTF-8 text (a binary file?)") from None
    return parse_hostfile_text(text, source=str(path))


def world_size(hosts: list[Host]) -> int:
    return sum(h.slots for h in hosts)


def format_hostfile(hosts: list[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def main(argv: list[str] | None = None) -> int:
    """`python -m spoxl.cluster.hostfile FILE`: validate FILE (for launch scripts, before fan-out)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m spoxl.cluster.hostfile HOSTFILE", file=sys.stderr)
        return 2
    try:
        hosts = parse_hostfile(argv[0])
    except SpoxlError as e:
        print(f"hostfile: error: {e}", file=sys.stderr)
        return 2
    print(f"{argv[0]}: {len(hosts)} node(s), {world_size(hosts)} ranks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
