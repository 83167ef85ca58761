"""Settings, built once at the entry point from CLI flags and ``QUICKSILVER_*`` variables.

Everything inside the broker takes keyword arguments with safe defaults; only this module reads the
environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auth.tokens import Secret

DEFAULT_PUBLIC_PATTERNS = (
    "reports/**",
    "summary/**",
    "uploads/**",
    "stats/**",
)


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Broker configuration. Every limit here is a bound with a stated overflow policy."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./data")
    #: PostgreSQL URL of a store shared by several nodes (``postgresql://...``; optional query
    #: ``?search_path=SCHEMA``); SQLite in ``data_dir`` when unset.
    database_url: str | None = None
    #: Connections each node keeps to PostgreSQL at most (plus one for notifications).
    database_pool_size: int = 10
    #: SQLite: run small groups of job writes on the event loop (False: always in the writer
    #: thread, for a data directory on a slow or network disk). See broker.store.sqlite.
    sqlite_inline_writes: bool = True
    #: Redis URL of the backplane between several nodes (``redis://...``); one node when unset.
    redis_url: str | None = None
    #: Prefix of every Redis key and channel; nodes of one cluster share it.
    redis_prefix: str = "quicksilver"
    #: Seconds a topic's offsets, epoch and history stay in Redis after its last message.
    redis_history_ttl: float = 3600.0
    secret: Secret | None = None
    #: PEM public key file for RS256/ES256 tokens (replaces HS256 when set).
    public_key_file: Path | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    #: Anonymous clients (``{"type":"auth"}`` without a token) may read the public patterns.
    allow_anonymous: bool = True
    public_patterns: tuple[str, ...] = DEFAULT_PUBLIC_PATTERNS
    #: Browser Origins allowed besides same-origin; ``*`` allows all.
    allowed_origins: tuple[str, ...] = ()
    #: Frames larger than this close the connection with 1009.
    max_frame_bytes: int = 1 << 20
    #: Bytes queued for one client before it is closed with 1013 as a slow consumer.
    max_buffer_bytes: int = 2 << 20
    auth_timeout: float = 10.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: Per-topic in-memory history window for topics without a persistence rule.
    history_size: int = 100
    #: Lease given to a worker for each job; renewed by heartbeat and progress frames.
    job_lease: float = 30.0
    #: How often expired leases are looked for.
    lease_check_interval: float = 1.0
    retry_backoff_base: float = 1.0
    retry_backoff_cap: float = 300.0
    #: A close handshake the peer does not finish within this many seconds is aborted.
    close_timeout: float = 5.0
    #: Most subscriptions one connection may hold.
    max_subscriptions: int = 1000
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    access_log: bool = False
    #: Queue of the ``process_report`` jobs (CPAN Testers reports).
    reports_queue: str = "reports"
    #: ``POST /v3/report`` needs a token that may enqueue on ``reports_queue`` (else open).
    reports_require_token: bool = False
    #: Most rows one ``/v3`` list answer holds; ask again with ``since`` for more.
    v3_max_rows: int = 10_000
    #: ``Cache-Control: max-age`` of ``/v3`` list answers, seconds (reports by id: a day).
    v3_cache_max_age: int = 5
    #: Changed statistics are published on ``stats/<name>`` at most this often, seconds.
    stats_publish_interval: float = 0.25
    #: Serve Mercury's routes (``/bus``, ``/pub``, ``/sub``, ``/push``, ``/pull``).
    mercury: bool = True
    #: Mercury routes need a token (``Authorization: Bearer`` or ``?token=``); without one a
    #: client has anonymous rights. Off: no token means every right, as in Mercury itself.
    mercury_require_auth: bool = True
    #: Mercury's ``allow_origin``: Origins allowed on the Mercury routes (``*`` wildcards);
    #: empty: the native Origin policy.
    mercury_allow_origin: tuple[str, ...] = ()
    #: How often a pull pool with idle pullers looks for pushes enqueued elsewhere, seconds.
    mercury_poll_interval: float = 1.0
    #: Attempts of one webhook delivery before its job fails (an operator may retry it).
    webhook_max_attempts: int = 10
    #: Webhook retry back-off: full jitter up to ``base * 2**(attempt-1)``, at most ``cap``.
    webhook_backoff_base: float = 1.0
    webhook_backoff_cap: float = 600.0
    #: Seconds one webhook POST may take (connect, send, response head); at most half the lease.
    webhook_timeout: float = 10.0
    #: How often an idle webhook looks for deliveries retried by an operator, seconds.
    webhook_poll_interval: float = 1.0
    #: Messages waiting to become webhook deliveries; beyond it the oldest are dropped (counted).
    webhook_intake_max: int = 10_000
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Topic history rules ``PATTERN=KEEP[:MAX_AGE_SECONDS]``, first match wins; matching topics
    #: are persisted in the store (``KEEP`` 0: no history at all). See broker.history.
    history_rules: tuple[str, ...] = ("reports/**=1000:86400",)
    #: Topics with state in memory; the least recently used is forgotten beyond this.
    history_max_topics: int = 10_000
    #: Messages of persisted topics waiting for the store; the oldest are dropped beyond this.
    history_pending_max: int = 100_000
    #: Seconds between trims of persisted history to its rules.
    history_trim_interval: float = 60.0
    #: Topics whose subscribers are tracked and announced on ``presence/<topic>``.
    presence_patterns: tuple[str, ...] = ()
    #: Per-connection limits ``KEY=FRAMES[:BYTES]`` per second by role (see broker.ratelimit).
    rate_limits: tuple[str, ...] = ("anonymous=100:1048576",)
    #: Seconds' worth of the rate a connection may send at once.
    rate_limit_burst: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings: defaults, then ``QUICKSILVER_*`` (and ``PORT``), then ``overrides``.

        Overrides whose value is None are ignored so CLI flags that were not given do not mask
        the environment.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if "PORT" in env:
            values["port"] = int(env["PORT"])
        simple: dict[str, Any] = {
            "HOST": ("host", str),
            "PORT": ("port", int),
            "DATA_DIR": ("data_dir", Path),
            "DATABASE_URL": ("database_url", str),
            "REDIS_URL": ("redis_url", str),
            "REDIS_PREFIX": ("redis_prefix", str),
            "REDIS_HISTORY_TTL": ("redis_history_ttl", float),
            "DATABASE_POOL_SIZE": ("database_pool_size", int),
            "SECRET": ("secret", Secret),
            "PUBLIC_KEY_FILE": ("public_key_file", Path),
            "JWT_ALGORITHMS": ("jwt_algorithms", _split),
            "ALLOW_ANONYMOUS": ("allow_anonymous", _bool),
            "PUBLIC_PATTERNS": ("public_patterns", _split),
            "ALLOWED_ORIGINS": ("allowed_origins", _split),
            "MAX_FRAME_BYTES": ("max_frame_bytes", int),
            "MAX_BUFFER_BYTES": ("max_buffer_bytes", int),
            "AUTH_TIMEOUT": ("auth_timeout", float),
            "PING_INTERVAL": ("ping_interval", float),
            "PING_TIMEOUT": ("ping_timeout", float),
            "HISTORY_SIZE": ("history_size", int),
            "JOB_LEASE": ("job_lease", float),
            "LEASE_CHECK_INTERVAL": ("lease_check_interval", float),
            "RETRY_BACKOFF_BASE": ("retry_backoff_base", float),
            "RETRY_BACKOFF_CAP": ("retry_backoff_cap", float),
            "SHUTDOWN_TIMEOUT": ("shutdown_timeout", float),
            "CLOSE_TIMEOUT": ("close_timeout", float),
            "MAX_SUBSCRIPTIONS": ("max_subscriptions", int),
            "LOG_LEVEL": ("log_level", str),
            "ACCESS_LOG": ("access_log", _bool),
            "SQLITE_INLINE_WRITES": ("sqlite_inline_writes", _bool),
            "HISTORY_RULES": ("history_rules", _split),
            "HISTORY_MAX_TOPICS": ("history_max_topics", int),
            "HISTORY_PENDING_MAX": ("history_pending_max", int),
            "HISTORY_TRIM_INTERVAL": ("history_trim_interval", float),
            "PRESENCE_PATTERNS": ("presence_patterns", _split),
            "RATE_LIMITS": ("rate_limits", _split),
            "RATE_LIMIT_BURST": ("rate_limit_burst", float),
            "REPORTS_QUEUE": ("reports_queue", str),
            "REPORTS_REQUIRE_TOKEN": ("reports_require_token", _bool),
            "V3_MAX_ROWS": ("v3_max_rows", int),
            "V3_CACHE_MAX_AGE": ("v3_cache_max_age", int),
            "STATS_PUBLISH_INTERVAL": ("stats_publish_interval", float),
            "MERCURY": ("mercury", _bool),
            "MERCURY_REQUIRE_AUTH": ("mercury_require_auth", _bool),
            "MERCURY_ALLOW_ORIGIN": ("mercury_allow_origin", _split),
            "MERCURY_POLL_INTERVAL": ("mercury_poll_interval", float),
            "WEBHOOK_MAX_ATTEMPTS": ("webhook_max_attempts", int),
            "WEBHOOK_BACKOFF_BASE": ("webhook_backoff_base", float),
            "WEBHOOK_BACKOFF_CAP": ("webhook_backoff_cap", float),
            "WEBHOOK_TIMEOUT": ("webhook_timeout", float),
            "WEBHOOK_POLL_INTERVAL": ("webhook_poll_interval", float),
            "WEBHOOK_INTAKE_MAX": ("webhook_intake_max", int),
        }
        for suffix, (name, convert) in simple.items():
            raw = env.get("QUICKSILVER_" + suffix)
            if raw is not None and raw != "":
                try:
                    values[name] = convert(raw)
                except ValueError as exc:
                    raise ValueError(f"QUICKSILVER_{suffix}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)
