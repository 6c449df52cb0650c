"""Commands on built shards: merge, verify, inspect (a folder, a manifest or s3://bucket/prefix)."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import click

from wds_ocr.cli.base import (
    cli,
    local_path,
    config_options,
    handle_errors,
    load_with_base,
    plural,
)
from wds_ocr.errors import UsageError


from wds_ocr.cli.data import reason_group, reason_head


@cli.command()
@click.argument("folder")
@handle_errors
def merge(folder: str) -> None:
    """Join the part manifests of a partitioned build in FOLDER (or s3://bucket/prefix) into manifest.json."""
    from wds_ocr.storage import output_kind

    if output_kind(folder, "FOLDER") == "s3":
        from wds_ocr.shards.bucket import merge_bucket
        from wds_ocr.storage.s3 import S3Url

        manifest, path = merge_bucket(S3Url.parse(folder))
    else:
        from wds_ocr.shards.merge import merge_parts

        manifest, path = merge_parts(local_path(folder))
    click.echo(f"merged {manifest.counts.written} samples in {len(manifest.shards)} shards into {path}")


@contextlib.contextmanager
def readable_copy(location: str, key: str | None = "*"):
    """A local path for a shard location: itself, or for s3://... a temporary copy of the manifest,
    the rejects file and the shards (every one, or only the one holding ``key``)."""
    from wds_ocr.storage import scheme_of

    scheme = scheme_of(location)
    if scheme == "s3":
        from wds_ocr.shards.bucket import download
        from wds_ocr.storage.s3 import S3Url

        with tempfile.TemporaryDirectory(prefix="wds-ocr-copy-") as tmp:
            yield download(S3Url.parse(location), Path(tmp), key=key)
        return
    if scheme not in ("", "file"):
        raise UsageError(f"{location}: give a shard folder, a manifest or s3://bucket/prefix")
    path = local_path(location)
    if not path.exists():
        raise UsageError(f"{location} does not exist")
    yield path


VERIFY_SHOWN = 20  # problems printed one by one; more are summarized
VERIFY_EXAMPLES = 3
_LINE_WIDTH = 240


def problem_lines(problems, show_all: bool) -> list[str]:
    """verify's problems: every one when few or with --all, else counted by kind with examples."""
    if show_all or len(problems) <= VERIFY_SHOWN:
        return [problem.line() for problem in problems]
    groups: dict[str, list] = {}
    for problem in problems:
        groups.setdefault(reason_group(problem.what), []).append(problem)
    lines = [f"{len(problems)} problems of {plural(len(groups), 'kind')} (--all prints every one):"]
    for members in sorted(groups.values(), key=len, reverse=True):
        heads = {reason_head(problem.what) for problem in members}
        label = reason_head(members[0].what) + ("" if len(heads) == 1 else " (and the like)")
        lines.append(f"  {len(members)} x {label}")
        for problem in members[:VERIFY_EXAMPLES]:
            line = problem.line()
            lines.append(f"      {line if len(line) <= _LINE_WIDTH else line[: _LINE_WIDTH - 3] + '...'}")
        if len(members) > VERIFY_EXAMPLES:
            lines.append(f"      ... and {len(members) - VERIFY_EXAMPLES} more")
    return lines


@cli.command()
@click.argument("shards")
@click.option("--against-source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Re-run the live pipeline on this source and require bit-equal records.")
@click.option("--sample", type=click.IntRange(1), help="With --against-source: compare K random records only.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for --sample.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all", "show_all", is_flag=True,
              help=f"Print every problem (default: all of them up to {VERIFY_SHOWN}, else counts by kind and "
                   f"the first {VERIFY_EXAMPLES} of each).")
@config_options
@handle_errors
def verify(shards: str, against_source: Path | None, sample: int | None, seed: int, as_json: bool, show_all: bool,
           config_file: Path | None, overrides: tuple[str, ...]) -> None:
    """Check SHARDS (folder or manifest): hashes, tar structure, records, staleness.

    Staleness is checked against the code's pipeline version, and against --config/--set
    when given; these start from the settings the shards were built with (as train's do), so
    --set transform.size=512 asks "are these shards current if transform.size were 512?".
    Exit 1 on any problem.
    """
    from wds_ocr.data.coverage import Coverage
    from wds_ocr.errors import ManifestError
    from wds_ocr.shards.manifest import load_manifest
    from wds_ocr.shards.verify import config_from_manifest, verify_shards

    with readable_copy(shards) as local:
        config = None
        if config_file or overrides:
            try:
                base = config_from_manifest(load_manifest(local)).model_dump(mode="json")
            except ManifestError:
                base = {}  # verify reports what is wrong with the manifest; the settings start from the defaults
            config = load_with_base(base, config_file, overrides)
        report = verify_shards(local, config, against_source, sample, seed)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1, sort_keys=True))
    else:
        for line in problem_lines(report.problems, show_all):
            click.echo(line)
        if report.samples_checked:
            click.echo(Coverage.from_dict(report.coverage).summary())
        compared = f", {report.compared_with_source} equal-checked against the source" if against_source else ""
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)" + (" (stale)" if report.stale else "")
        click.echo(f"{report.shards_checked} shards, {report.samples_checked} records checked{compared}: {verdict}")
    sys.exit(0 if report.ok else 1)


@cli.command()
@click.argument("shards")
@click.option("--key", help="Show this record (default: the first).")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Write a labelled picture: image + polygons (legend) | gt | mask | thresh_map (colour bar).")
@handle_errors
def inspect(shards: str, key: str | None, png: Path | None) -> None:
    """Counts, sizes, dtypes and bytes per sample of SHARDS; optionally a PNG of one record."""
    from wds_ocr.shards.inspect import inspect_shards

    with readable_copy(shards, key) as local:
        summary = inspect_shards(local, key, png)
    for line in summary.lines():
        click.echo(line)
