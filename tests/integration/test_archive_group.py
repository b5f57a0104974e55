"""`archive --pattern`: many databases over the members of a group, exactly once across a member's kill -9.

Real Kafka, real SeaweedFS S3, real journaled PicoLisp pools, the CLIs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_archive import archived_txn_ids, assert_same, s3_env, source_copy, store_for
from tests.picolisp_fixtures import *  # noqa: F401,F403
from tests.picolisp_fixtures import PicoApp
from tests.pipeline_helpers import BIN, Cli, committed_transactions, ok, unique_name, wait_for

pytestmark = pytest.mark.integration


def test_four_databases_over_two_members_are_each_archived_exactly_once_when_one_member_dies(
    tmp_path: Path, kafka: Any, s3: Any, s3_client: Any, picolisp: str
) -> None:
    prefix = unique_name("agrp").replace("-", "")[:20]
    apps: list[PicoApp] = []
    clis: list[Cli] = []
    for i in range(4):
        app = PicoApp(tmp_path / f"app{i}", picolisp)
        app.create()
        app.workload(30, seed=300 + i)
        apps.append(app)
        clis.append(Cli(app.root, kafka.bootstrap_servers, f"{prefix}{i}", extra_env=s3_env(s3)))
        ok(clis[-1].agent_once(), f"capture-agent {prefix}{i}")
    stores = [store_for(s3_client, s3.bucket, "grp", c.database) for c in clis]

    def member(name: str) -> list[str]:
        return [
            str(BIN / "archive"),
            "--pattern",
            f"{prefix}[0-9]",
            "--group",
            prefix,
            "--bucket",
            f"s3://{s3.bucket}/grp",
            "--work-dir",
            str(tmp_path / name),  # one per member: as if on two machines
            "--max-delay",
            "0.2",
        ]

    def archived(i: int) -> int:
        segments = stores[i].catalog().segments
        return segments[-1].last_txn if segments else 0

    runner = clis[0]
    try:
        m1 = runner.start("member1", member("m1"))
        m2 = runner.start("member2", member("m2"))
        wait_for(lambda: all(archived(i) >= 1 for i in range(4)), 90, "the two members to archive all 4 databases")
        wait_for(
            lambda: "assigned" in m1.stdout() and "assigned" in m2.stdout(),
            30,
            "each member to be assigned databases",
        )
        m1.kill9()
        for i, c in enumerate(clis):
            apps[i].workload(20, seed=400 + i)
            ok(c.agent_once(), f"capture-agent {c.database}")
        last = [committed_transactions(c.bootstrap_servers, c.database)[-1].txn_id for c in clis]
        wait_for(lambda: all(archived(i) == last[i] for i in range(4)), 120, f"member2 to take over and archive {last}")
        assert m2.alive(), m2.output()
        assert m2.stop() == 0, m2.output()
    finally:
        runner.stop_all()
    for i, c in enumerate(clis):
        assert archived_txn_ids(stores[i]) == list(range(1, last[i] + 1)), c.database
        expected = source_copy(apps[i], tmp_path / f"source{i}")
        target = tmp_path / f"restored{i}"
        ok(
            c.run(
                [
                    str(BIN / "restore"),
                    "--database",
                    c.database,
                    "--bucket",
                    f"s3://{s3.bucket}/grp",
                    "--target",
                    str(target),
                ]
            ),
            f"restore {c.database}",
        )
        assert_same(expected, target, apps[i])
