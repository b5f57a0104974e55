"""The secured dev stack: a SCRAM principal per role, its client config, SASL_SSL broker settings, ACLs."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pool_pipeline.devcerts import DevCerts, make_certs, write_private

# One SCRAM-SHA-512 principal per role. `admin` is also the brokers' own principal (a super user).
ROLES: tuple[str, ...] = ("agent", "replica", "archive", "analytics", "admin")
ADMIN = "admin"
MECHANISM = "SCRAM-SHA-512"
LISTENER = "SASL_SSL"  # the only listener clients get

# What each role may do, as (resource type, pattern type, name, operations). Names follow the CLIs'
# defaults: topics pool.<database> (connectors/kafka/topics.py), the agent's transactional id
# pool-pipeline.capture.<database> (connectors/kafka/publisher.py), the groups replica / archive /
# analytics (--group defaults; replica-1, archive-2 ... match the prefix too), analytics'
# transactional ids pool-pipeline.analytics.<group>.<database> (pool_pipeline/analytics.py).
TOPIC_PREFIX = "pool."
AGENT_TRANSACTIONAL_PREFIX = "pool-pipeline.capture."
ANALYTICS_TRANSACTIONAL_PREFIX = "pool-pipeline.analytics."
GRANTS: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = {
    "agent": [
        ("TOPIC", "PREFIXED", TOPIC_PREFIX, ("CREATE", "WRITE", "READ", "DESCRIBE", "DESCRIBE_CONFIGS")),
        ("TRANSACTIONAL_ID", "PREFIXED", AGENT_TRANSACTIONAL_PREFIX, ("WRITE", "DESCRIBE")),
    ],
    "replica": [
        ("TOPIC", "PREFIXED", TOPIC_PREFIX, ("READ", "DESCRIBE")),
        ("GROUP", "PREFIXED", "replica", ("READ", "DESCRIBE")),
    ],
    "archive": [
        ("TOPIC", "PREFIXED", TOPIC_PREFIX, ("READ", "DESCRIBE")),
        ("GROUP", "PREFIXED", "archive", ("READ", "DESCRIBE")),
    ],
    "analytics": [
        ("TOPIC", "PREFIXED", TOPIC_PREFIX, ("READ", "DESCRIBE")),
        ("GROUP", "PREFIXED", "analytics", ("READ", "DESCRIBE")),
        ("TRANSACTIONAL_ID", "PREFIXED", ANALYTICS_TRANSACTIONAL_PREFIX, ("WRITE", "DESCRIBE")),
    ],
}
# Kafka's ACL patterns are literal or prefixed, never suffixes: "only analytics writes *.stats" is
# granted per database, pool.<database>.stats, with a DENY for the agent (whose prefixed pool. grant
# would otherwise cover it; DENY wins over ALLOW).
STATS_GRANTS = ("CREATE", "WRITE", "DESCRIBE", "DESCRIBE_CONFIGS")
STATS_DENIED_TO_AGENT = ("CREATE", "WRITE")

PASSWORDS_FILE = "passwords.json"


@dataclass(frozen=True, repr=False)
class KafkaSecurity:
    """What a secured broker is started with: the TLS files and each role's SCRAM password."""

    certs: DevCerts
    passwords: Mapping[str, str]

    def __repr__(self) -> str:
        return f"KafkaSecurity(certs={self.certs!r}, roles={sorted(self.passwords)!r})"

    @property
    def admin_password(self) -> str:
        return self.passwords[ADMIN]


def prepare(directory: Path) -> KafkaSecurity:
    """The stack's TLS files and passwords in `directory` (mode 0700), made on first use and kept after
    (SCRAM credentials are written into Kafka's storage when it is formatted, so they must not change
    while that storage lives)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    tls = directory / "tls"
    if (tls / "ca.pem").is_file() and (tls / "server-bundle.pem").is_file():
        certs = DevCerts(tls / "ca.pem", tls / "server.pem", tls / "server.key", tls / "server-bundle.pem")
    else:
        certs = make_certs(tls)
    stored = directory / PASSWORDS_FILE
    passwords: dict[str, str] = {}
    if stored.is_file():
        try:
            loaded = json.loads(stored.read_text())
            passwords = {r: str(loaded[r]) for r in ROLES}
        except (ValueError, KeyError, TypeError):
            passwords = {}
    if not passwords:
        # URL-safe characters only: they need no quoting in JAAS, SCRAM format strings or properties files.
        passwords = {role: secrets.token_urlsafe(24) for role in ROLES}
        write_private(stored, (json.dumps(passwords, indent=1) + "\n").encode())
    return KafkaSecurity(certs, passwords)


def broker_properties(security: KafkaSecurity, client_port: int, controller_port: int) -> dict[str, str]:
    """server.properties entries of a secured node: SASL_SSL for clients and between brokers (SCRAM-SHA-512,
    as admin), SASL_SSL with PLAIN for the controller listener (KRaft controllers cannot check SCRAM: the
    credentials live in the metadata they serve), the StandardAuthorizer with admin as the only super user.
    The passwords make the file secret: write it with mode 0600."""
    pw = security.admin_password
    scram = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{ADMIN}" password="{pw}";'
    plain = (
        f'org.apache.kafka.common.security.plain.PlainLoginModule required username="{ADMIN}" password="{pw}" '
        f'user_{ADMIN}="{pw}";'
    )
    return {
        "listeners": f"{LISTENER}://127.0.0.1:{client_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"{LISTENER}://127.0.0.1:{client_port}",
        "inter.broker.listener.name": LISTENER,
        "listener.security.protocol.map": f"CONTROLLER:SASL_SSL,{LISTENER}:SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": plain,
        f"listener.name.{LISTENER.lower()}.{MECHANISM.lower()}.sasl.jaas.config": scram,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(security.certs.bundle),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(security.certs.ca),
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.client.auth": "none",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN}",
        "allow.everyone.if.no.acl.found": "false",
    }


def client_config_text(security: KafkaSecurity, role: str, bootstrap_servers: str) -> str:
    """A --kafka-config / $KAFKA_CLIENT_CONFIG file for principal `role` (it holds a password: mode 0600)."""
    return (
        f"# pool-pipeline dev stack: Kafka client settings of principal {role} (mode 0600: it holds a password)\n"
        f"bootstrap.servers={bootstrap_servers}\n"
        f"security.protocol={LISTENER}\n"
        f"sasl.mechanism={MECHANISM}\n"
        f"sasl.username={role}\n"
        f"sasl.password={security.passwords[role]}\n"
        f"ssl.ca.location={security.certs.ca}\n"
        "ssl.endpoint.identification.algorithm=https\n"
    )


def admin_options(security: KafkaSecurity, role: str = ADMIN) -> dict[str, Any]:
    """kafka-python options of principal `role` (what its client config file says)."""
    return {
        "security_protocol": LISTENER,
        "sasl_mechanism": MECHANISM,
        "sasl_plain_username": role,
        "sasl_plain_password": security.passwords[role],
        "ssl_cafile": str(security.certs.ca),
        "ssl_check_hostname": True,
    }


def write_client_configs(security: KafkaSecurity, directory: Path, bootstrap_servers: str) -> dict[str, str]:
    """One client config per role in `directory`; {role: path}."""
    paths = {}
    for role in ROLES:
        path = Path(directory) / f"{role}.properties"
        write_private(path, client_config_text(security, role, bootstrap_servers).encode())
        paths[role] = str(path)
    return paths


def acl_bindings(stats_databases: Sequence[str] = ()) -> list[tuple[str, str, str, str, str, str]]:
    """Every ACL of the stack as (principal, permission, resource type, pattern type, name, operation)."""
    rows = []
    for role, grants in GRANTS.items():
        for resource, pattern, name, operations in grants:
            rows += [(f"User:{role}", "ALLOW", resource, pattern, name, op) for op in operations]
    for database in stats_databases:
        topic = f"{TOPIC_PREFIX}{database}.stats"
        rows += [("User:analytics", "ALLOW", "TOPIC", "LITERAL", topic, op) for op in STATS_GRANTS]
        rows += [("User:agent", "DENY", "TOPIC", "LITERAL", topic, op) for op in STATS_DENIED_TO_AGENT]
    return rows


def create_acls(admin: Any, stats_databases: Sequence[str] = ()) -> int:
    """Create the stack's ACLs with a kafka-python admin client (of a super user); returns how many.
    Creating an ACL that exists already is a no-op on the broker, so this is idempotent."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    acls = [
        ACL(
            principal=principal,
            host="*",
            operation=ACLOperation[op],
            permission_type=ACLPermissionType[permission],
            resource_pattern=ResourcePattern(ResourceType[resource], name, ACLResourcePatternType[pattern]),
        )
        for principal, permission, resource, pattern, name, op in acl_bindings(stats_databases)
    ]
    result = admin.create_acls(acls)
    failed = result.get("failed") or []
    if failed:
        first = failed[0]
        raise RuntimeError(f"the broker refused {len(failed)} ACL(s), e.g. {first}")
    return len(acls)
