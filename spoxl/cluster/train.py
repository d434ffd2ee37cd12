"""`spoxl.train` under the job-wide failure watchdog: the module the launch/ scripts start.

    deepspeed ... --module spoxl.cluster.train --config X.yaml [--set k=v ...] [--resume]

Same arguments and behaviour as `spoxl.train`; in addition, when any rank dies (exception,
SIGKILL, lost node) every rank exits non-zero within the watchdog timeout, naming the failed
rank (see spoxl.cluster.watchdog). A non-zero exit status of a rank (e.g. a one-line SpoxlError
that only this rank hit) is recorded as that rank's failure too, so the others do not wait for it
in a collective.
"""

from __future__ import annotations

import sys

from spoxl.cluster.watchdog import watch_job


def main(argv: list[str] | None = None) -> int:
    from spoxl import train

    with watch_job():
        code = train.main(argv)
        if code:
            raise SystemExit(code)  # watch_job records a non-zero exit as this rank's failure
    return 0


if __name__ == "__main__":
    sys.exit(main())
