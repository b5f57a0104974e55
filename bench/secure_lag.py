"""Commit -> replica lag and the capture-agent's CPU, plaintext vs SASL_SSL (SCRAM-SHA-512, ACLs), in one run.

    .venv/bin/python bench/secure_lag.py [--rate 200] [--duration 20] [--order plain,secure,secure+enc]

Each setting gets its own private single-node broker (the same launcher as `pipeline dev up`, with
`--secure`'s settings for SASL_SSL) and its own PicoLisp app; the agent and the replica are the
real console scripts (bench/lag.py's "plain" mode), and over SASL_SSL they run as the agent and
replica principals with their client configs. Agent CPU = user + system time of the capture-agent
process over its whole run (start, catch-up of --initial txns, the paced workload), read from
/proc before it is stopped. `secure+enc` adds payload encryption (AES-256-GCM, a key made with
`pipeline keygen`, given to both as $POOL_PIPELINE_KEY_FILE).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lag  # noqa: E402
from _common import log, new_app, percentile, table, workdir  # noqa: E402

from connectors.kafka.client import KafkaSettings  # noqa: E402
from pipeline.codec import Codec  # noqa: E402
from pool_pipeline import devsecure  # noqa: E402
from pool_pipeline.devstack import start_kafka  # noqa: E402
from schemas import load_schemas  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
LABELS = {"plain": "PLAINTEXT", "secure": "SASL_SSL + SCRAM + ACLs", "secure+enc": "SASL_SSL + ACLs + AES-GCM payloads"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def run(setting: str, root: Path, args: argparse.Namespace) -> dict:
    from connectors.keys import keygen, load_keyring

    security = devsecure.prepare(root / "secure") if setting.startswith("secure") else None
    key_file = root / "pool.key" if setting.endswith("+enc") else None
    if key_file is not None:
        keygen(key_file)
    cluster = start_kafka(root / "kafka", brokers=1, secure=security, detach=False)
    try:
        configs: dict[str, str] = {}
        kafka: KafkaSettings | str = cluster.bootstrap_servers
        if security is not None:
            admin = cluster.settings().admin(client_id="bench")
            try:
                devsecure.create_acls(admin)
            finally:
                admin.close()
            configs = devsecure.write_client_configs(security, root / "secure", cluster.bootstrap_servers)
            kafka = KafkaSettings.from_properties(configs["admin"])
        log(f"{setting}: broker at {cluster.bootstrap_servers}")
        app = new_app(root / "app")
        app.workload(args.initial, seed=1, blobs=True)

        spawned: list = []
        cpu: dict[str, float] = {}
        real_spawn, real_stop, real_env = lag.spawn, lag.stop, lag.env_with

        def spawn(argv, **kw):  # type: ignore[no-untyped-def]
            name = Path(argv[0]).name
            if name not in ("capture-agent", "replica"):
                return real_spawn(argv, **kw)  # the PicoLisp workload
            role = "agent" if name == "capture-agent" else "replica"
            if configs:
                kw["env"] = {**kw["env"], "KAFKA_CLIENT_CONFIG": configs[role]}
            if key_file is not None:
                kw["env"] = {**kw["env"], "POOL_PIPELINE_KEY_FILE": str(key_file)}
            proc = real_spawn(argv, **kw)
            spawned.append((role, proc))
            return proc

        def stop(proc, timeout: float = 10):  # type: ignore[no-untyped-def]
            for role, p in spawned:
                if p is proc:
                    cpu[role] = cpu_seconds(proc.pid)
            return real_stop(proc, timeout)

        lag.spawn, lag.stop = spawn, stop
        lag.env_with = lambda _kafka: real_env(cluster.bootstrap_servers)  # the children get a string
        try:
            started = time.monotonic()
            keyring = load_keyring(key_file) if key_file is not None else None
            res = lag.run_phase("plain", app, kafka, Codec(load_schemas(), keyring=keyring), root, args, seed=10)
            res["wall"] = time.monotonic() - started
        finally:
            lag.spawn, lag.stop, lag.env_with = real_spawn, real_stop, real_env
        res["cpu"] = cpu
        return res
    finally:
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--initial", type=int, default=500)
    ap.add_argument("--order", default="plain,secure,secure+enc")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.poll_interval, args.no_blobs, args.mode = 0.02, False, "plain"
    args.what_if_backoff, args.what_if_async_ack, args.what_if_no_fsync = None, False, False
    results = {}
    for setting in args.order.split(","):
        results[setting] = run(setting, workdir(f"secure-lag-{setting}", keep=args.keep), args)
    rows = []
    for setting, res in results.items():
        lags = [v * 1000 for v in res["components"]["lag"]]
        rows.append([
            LABELS.get(setting, setting),
            f"{res['rate']:.0f}", str(res["commits"]),
            f"{percentile(lags, 50):.1f}", f"{percentile(lags, 99):.1f}", f"{max(lags):.1f}",
            f"{res['cpu'].get('agent', float('nan')):.2f}", f"{res['cpu'].get('replica', float('nan')):.2f}",
            f"{res['wall']:.0f}",
        ])  # fmt: skip
    headers = ["setting", "commits/s", "commits", "lag p50 ms", "lag p99 ms", "max ms", "agent CPU s",
               "replica CPU s", "phase s"]  # fmt: skip
    print(table(headers, rows, title=f"commit -> replica lag at {args.rate} commits/s for {args.duration:.0f} s"))
    base = results.get("plain", {}).get("cpu", {}).get("agent")
    for setting in ("secure", "secure+enc"):
        other = results.get(setting, {}).get("cpu", {}).get("agent")
        if base and other:
            print(f"agent CPU, {setting} vs PLAINTEXT: {other / base:.2f}x ({(other / base - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
