"""Every console script's argument parser by name (compose.yaml checks, docs)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pool_pipeline.cli.admin import pipeline_parser
from pool_pipeline.cli.analytics import analytics_parser
from pool_pipeline.cli.archive import archive_parser
from pool_pipeline.cli.capture_agent import capture_agent_parser
from pool_pipeline.cli.replica import replica_parser
from pool_pipeline.cli.restore import restore_parser
from pool_pipeline.cli.verify import verify_parser

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "capture-agent": capture_agent_parser,
    "replica": replica_parser,
    "archive": archive_parser,
    "analytics": analytics_parser,
    "restore": restore_parser,
    "verify": verify_parser,
    "pipeline": pipeline_parser,
}
