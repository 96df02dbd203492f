"""`python -m tests.reliability.bridge_proc COUNT_FILE`: the bridge (chalicelib.worker's
main, unchanged) with its store swapped for a CountingStore that appends each winning
transition to COUNT_FILE. Settings come from the environment, as for
`python -m chalicelib.worker` with STAGE=test; the scenarios SIGKILL this process."""

from __future__ import annotations

import dataclasses
import logging
import sys

from chalicelib import deps
from chalicelib.worker.__main__ import main as worker_main
from tests.counting import CountingStore


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    d = deps.build()
    deps.use(dataclasses.replace(d, store=CountingStore(argv[0])))
    return worker_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
