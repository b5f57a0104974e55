"""The end-to-end demo: local stack, a PicoLisp app, capture-agent + replica + archiver live, verify, restore."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LISP = ROOT / "tests" / "lisp"  # the demo app is the same PicoLisp app the test suite drives


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(cmd: list[str], suffix: str = "") -> None:
    print(f"$ {' '.join(shlex.quote(c) for c in cmd)}{suffix}", flush=True)


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    show(cmd)
    proc = subprocess.run(cmd, cwd=cwd, env=env, text=True, capture_output=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `{cmd[0]}` failed with exit code {proc.returncode}")
    return proc


def background(cmd: list[str], cwd: Path, env: dict[str, str], label: str) -> subprocess.Popen:
    """Start a service and prefix its output lines with its name, as they come."""
    show(cmd, " &")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"  [{label}] {line.rstrip()}", flush=True)

    threading.Thread(target=pump, daemon=True).start()
    return proc


def pil(script: str, *args: object) -> list[str]:
    return ["pil", str(LISP / "app.l"), str(LISP / script), *map(str, args), "-bye"]


def replica_txn(app: Path) -> int:
    pos = app / "rpl/db/app/.pool-pipeline/position.json"
    try:
        return json.loads(pos.read_text())["txn_id"]
    except (OSError, ValueError, KeyError):
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--txns", type=int, default=3000, help="transactions the demo app commits")
    parser.add_argument("--sleep-ms", type=int, default=2, help="pause between the app's commits")
    parser.add_argument("--workdir", type=Path, default=ROOT / "demo-data")
    parser.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    parser.add_argument(
        "--secure",
        action="store_true",
        help="the same flow on a secured stack: Kafka SASL_SSL only (SCRAM-SHA-512, one principal per command, "
        "ACLs), S3 over https, the archive stored with SSE-S3, record values and snapshots encrypted with a key "
        "file made by `pipeline keygen`",
    )
    args = parser.parse_args()

    from pool_pipeline.devstack import free_port

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    app = work / "app"
    for d in ("db/app", "fifo", "blob/app"):
        (app / d).mkdir(parents=True)
    stack = work / "stack"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    try:
        say(
            "1. Start the local stack: Kafka (KRaft) and SeaweedFS S3, as plain processes"
            + (
                "\n   secured: SASL_SSL only with a SCRAM-SHA-512 user per role and ACLs, S3 over https, a CA made now"
                if args.secure
                else ""
            )
        )
        run(
            [
                "pipeline",
                "dev",
                "up",
                "--state-dir",
                str(stack),
                "--kafka-port",
                str(free_port()),
                "--s3-port",
                str(free_port(with_grpc_offset=True)),
                *(["--secure"] if args.secure else []),
            ],
            work,
            env,
        )

        def exports(role: str | None = None) -> dict[str, str]:
            cmd = ["pipeline", "dev", "env", "--state-dir", str(stack), *(["--role", role] if role else [])]
            out = run(cmd, work, env).stdout
            pairs = (line.removeprefix("export ").partition("=") for line in out.splitlines() if line)
            return {key: shlex.split(value)[0] if value else "" for key, _, value in pairs}

        env.update(exports())  # admin's client config on a secured stack
        # Each command runs as its own principal on a secured stack (its client config in $KAFKA_CLIENT_CONFIG).
        role_env = {role: {**env, **exports(role)} if args.secure else env for role in ("agent", "replica", "archive")}
        # Payload encryption on a secured stack: every command below that reads or writes records
        # (capture-agent, replica, archive, restore) gets the key file; it is made here, mode 0600.
        payload_args: list[str] = []
        key_file = work / "keys" / "app.key"
        if args.secure:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            run(["pipeline", "keygen", str(key_file)], work, env)
            payload_args = ["--encryption-key", str(key_file)]
        # What the archiver writes is encrypted at rest by S3 (SSE-S3) on a secured stack.
        sse_args = ["--sse", "AES256"] if args.secure else []

        say("2. A PicoLisp app creates its journaled pool: 5 DB files, 64 to 4096-byte blocks, blobs")
        run(pil("create.l", "db/app/", "fifo/app"), app, env)

        say(
            "3. capture-agent publishes the pool to topic pool.app; a replica consumer group follows it,\n"
            "   and an archiver writes it to S3 (Avro segments of whole txns, plus base snapshots)"
        )
        procs.append(
            background(
                ["capture-agent", "--pool", "db/app/", "--journal", "fifo/app", "--blob", "blob/app/", *payload_args],
                app,
                role_env["agent"],
                "capture-agent",
            )
        )
        procs.append(
            background(
                [
                    "replica",
                    "--database",
                    "app",
                    "--target",
                    "rpl/db/app/",
                    "--blob",
                    "rpl/blob/app/",
                    "--group",
                    "replica-1",
                    *payload_args,
                ],
                app,
                role_env["replica"],
                "replica",
            )
        )
        archive_cmd = [
            "archive",
            "--database",
            "app",
            "--bucket",
            f"s3://{env['POOL_PIPELINE_BUCKET']}/archive",
            "--work-dir",
            "archive-work",
            "--segment-txns",
            "250",
            "--snapshot-every-txns",
            "1000",
            *sse_args,
            *payload_args,
        ]
        procs.append(background(archive_cmd, app, role_env["archive"], "archive"))

        from connectors.kafka.client import KafkaSettings
        from connectors.kafka.topics import last_commit
        from connectors.keys import load_keyring
        from pipeline.codec import Codec
        from schemas import load_schemas

        codec = Codec(load_schemas(), keyring=load_keyring(key_file) if payload_args else None)
        kafka = KafkaSettings.from_env(env["KAFKA_BOOTSTRAP_SERVERS"], env.get("KAFKA_CLIENT_CONFIG"))

        def topic_txn() -> int:
            published = last_commit(kafka, "app", codec)
            return published[0].txn_id if published else 0

        def settle(what: str) -> int:
            """Wait until the agent has published everything and the replica applied it; the txn id."""
            deadline, stable_since, seen = time.monotonic() + 180, 0.0, -1
            while time.monotonic() < deadline:
                n = topic_txn()
                idle = (
                    (app / "fifo/app").stat().st_size == 0
                    and not (app / "fifo/app.agent/journal.spool").exists()
                    and not any(p.name.startswith("=") for p in (app / "blob/app").iterdir())
                    and not any((app / "blob/app/.pool-pipeline-inflight").glob("*"))
                )
                if idle and replica_txn(app) == n > 0:
                    if n != seen:
                        seen, stable_since = n, time.monotonic()
                    elif time.monotonic() - stable_since >= 2:  # a blob-delete scan may still publish
                        return n
                else:
                    print(f"  [demo] {what}: topic at txn {n}, replica at txn {replica_txn(app)}", flush=True)
                time.sleep(0.5)
            raise SystemExit(f"demo: the pipeline did not settle within 180 s ({what})")

        def commit(txns: int, seed: int) -> None:
            started = time.monotonic()
            cmd = pil("workload.l", txns, seed, 1, args.sleep_ms, 0)
            show(cmd)
            workload = subprocess.Popen(
                cmd, cwd=app, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            while workload.poll() is None:
                time.sleep(1)
                print(
                    f"  [demo] app committing… replica at txn {replica_txn(app)} ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
            if workload.returncode != 0:
                raise SystemExit(f"demo: the PicoLisp workload failed: {workload.stderr.read()[-2000:]}")
            print(f"  [demo] the app committed {txns} txns in {time.monotonic() - started:.1f} s", flush=True)

        first = args.txns // 2
        say(f"4. The app commits {first} transactions (objects across files, deletes, blobs) while all run")
        commit(first, 1)
        earlier = settle("catching up")
        checkpoint = work / "checkpoint"
        shutil.copytree(app / "db/app", checkpoint / "db")
        shutil.copytree(app / "blob/app", checkpoint / "blob", ignore=shutil.ignore_patterns(".*"))
        print(f"  [demo] the source is at txn {earlier}; a copy of it is kept in {checkpoint} for later", flush=True)

        say(f"5. The app commits {args.txns - first} more transactions")
        commit(args.txns - first, 2)

        say("6. Wait until the replica has applied everything the agent published")
        latest = settle("catching up")
        print(f"  [demo] replica at txn {replica_txn(app)}", flush=True)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=60)
        procs.clear()

        say("7. verify: the replica is byte-identical to the source (md5 per file, every blob)")
        result = run(
            [
                "verify",
                "--pool",
                "db/app/",
                "--replica",
                "rpl/db/app/",
                "--blob",
                "blob/app/",
                "--replica-blob",
                "rpl/blob/app/",
            ],
            app,
            env,
            check=False,
        )
        if result.returncode != 0:
            return result.returncode

        say("8. The archiver, stopped while following, archives the rest (--once) and lists what S3 holds")
        run(archive_cmd + ["--once"], app, role_env["archive"])
        run(
            ["archive", "ls", "--database", "app", "--bucket", f"s3://{env['POOL_PIPELINE_BUCKET']}/archive"],
            app,
            role_env["archive"],
        )

        say(
            f"9. Point-in-time restore of txn {earlier} (of {latest}) from S3, then verify it against the copy "
            "of the source taken at that txn"
        )
        run(
            [
                "restore",
                "--database",
                "app",
                "--bucket",
                f"s3://{env['POOL_PIPELINE_BUCKET']}/archive",
                "--txn",
                str(earlier),
                "--target",
                "restored",
                *payload_args,
            ],
            app,
            role_env["archive"],
        )
        result = run(
            [
                "verify",
                "--pool",
                f"{checkpoint}/db/",
                "--replica",
                "restored/db/",
                "--blob",
                f"{checkpoint}/blob/",
                "--replica-blob",
                "restored/blob/",
            ],
            app,
            env,
            check=False,
        )
        return result.returncode
    finally:
        for proc in procs:
            proc.kill()
        if not args.keep:
            say("Stop the local stack")
            run(["pipeline", "dev", "down", "--state-dir", str(stack)], work, env, check=False)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
