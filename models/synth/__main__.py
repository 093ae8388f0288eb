"""``python -m models.synth OUT --n 100 --seed 1``: the same as `cxrnode synth`."""

import logging

from models.synth.command import get_args_parser, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main(get_args_parser().parse_args()))
