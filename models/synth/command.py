"""`cxrnode synth` (and ``python -m models.synth``): write a synthetic dataset in the RSNA layout."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.synth.dataset import generate_dataset

logger = logging.getLogger(__name__)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write synthetic chest radiographs with lung opacities in the RSNA Pneumonia Detection layout.",
        add_help=add_help,
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="new (or empty) folder for the dataset")
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)"
    )
    parser.add_argument("--min-size", type=int, default=512, help="smallest rows/columns in pixels (default 512)")
    parser.add_argument("--max-size", type=int, default=3000, help="largest rows/columns in pixels (default 3000)")
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.225,
        help="share of images with opacities (default 0.225, as in RSNA)",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """Generate the dataset the parsed arguments describe; 0 on success, 2 when an argument is unusable."""
    try:
        generate_dataset(
            args.out,
            args.n,
            args.seed,
            size_range=(args.min_size, args.max_size),
            positive_fraction=args.positive_fraction,
        )
    except (ValueError, FileExistsError) as error:
        logger.error("%s", error)
        return 2
    logger.info("wrote %d images to %s", args.n, args.out)
    return 0
