"""The ``wds-ocr`` command line: the only package that prints to the user or picks exit codes.

Commands import their modules lazily so ``wds-ocr --help`` stays fast and light.
Exit codes: 0 success, 1 a problem found or an operation failed, 2 bad usage or configuration.
"""

from wds_ocr.cli import bench, data, demo, model, pretrained, report, shards  # noqa: F401  (importing registers the commands)
from wds_ocr.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="wds-ocr")
