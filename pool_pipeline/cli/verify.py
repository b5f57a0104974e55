"""`verify`: compare a replica with its source, file by file (md5) and blob by blob."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pool_pipeline.cli.common import EXIT_USAGE, fail, parse, run


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify", description="Compare a replica with its source, file by file.")
    p.add_argument("--pool", required=True, help="source pool prefix")
    p.add_argument("--replica", required=True, help="replica pool prefix")
    p.add_argument("--blob", help="source blob directory")
    p.add_argument("--replica-blob", help="replica blob directory")
    return p


def _verify(args: argparse.Namespace) -> int:
    from connectors.picolisp.blobs import blob_tree, compare_blob_trees
    from connectors.picolisp.format import compare_pools, pool_files

    diffs = compare_pools(args.pool, args.replica)
    checked = f"{len(pool_files(args.pool))} pool files"
    if args.blob or args.replica_blob:
        if not (args.blob and args.replica_blob):
            fail("give both --blob and --replica-blob to compare blobs", EXIT_USAGE)
        diffs += compare_blob_trees(args.blob, args.replica_blob)
        checked += f" and {len(blob_tree(Path(args.blob)))} blobs"
    for line in diffs:
        print(f"DIFFERENT: {line}")
    if diffs:
        print(f"verify: {args.replica} differs from {args.pool} ({len(diffs)} difference(s))")
        return 1
    print(f"verify: identical: {checked} (md5 per file)")
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run(_verify, parse(verify_parser(), argv))
