"""The ``quicksilver`` command line: ``serve``, ``token``, ``publish``, ``subscribe``, ``worker``,
``replay``, ``webhook``.

Configuration comes from flags and ``QUICKSILVER_*`` environment variables; a flag wins over the
environment. Expected failures (a bad argument, a refused token, an unreachable server) print one
line on stderr and exit non-zero: 2 for a bad argument or configuration, 1 for everything else.

Each subcommand is one ``_add_<name>`` function that registers its arguments and one
``cmd_<name>`` function that runs it; a new subcommand adds one pair to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from protocol.codec import MAX_QUEUE_NAME, check_portable
from protocol.errors import (
    BadRequest,
    Forbidden,
    ProtocolError,
    QuicksilverError,
    Unauthorized,
    Unavailable,
    UsageError,
)
from protocol.frames import Message, Since
from protocol.topics import is_exact, parse_pattern, parse_topic

from . import __version__

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "CommandError", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_URL = "ws://127.0.0.1:8000/ws"
DEFAULT_DATA_DIR = "./data"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


class CommandError(Exception):
    """An expected failure of a command: one line on stderr, then exit with ``status``."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


# --- helpers ------------------------------------------------------------------------------------


def _env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """``QUICKSILVER_<name>``, or None when unset or blank."""
    value = (os.environ if environ is None else environ).get("QUICKSILVER_" + name, "").strip()
    return value or None


def _env_list(name: str) -> list[str]:
    value = _env(name)
    return [part.strip() for part in value.split(",") if part.strip()] if value else []


def _usage(message: str) -> NoReturn:
    raise CommandError(message, EXIT_USAGE)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help=f"the broker's WebSocket endpoint (env QUICKSILVER_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        help="the JWT to authenticate with (env QUICKSILVER_TOKEN; default: anonymous)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        help="seconds to wait for the connection and for each answer (default 10)",
    )


def _url(args: argparse.Namespace) -> str:
    url: str = args.url or _env("URL") or DEFAULT_URL
    return url


def _token(args: argparse.Namespace) -> str | None:
    token: str | None = args.token or _env("TOKEN")
    return token


def _describe(exc: QuicksilverError) -> str:
    """One line for an expected failure."""
    message = exc.message if isinstance(exc, ProtocolError) else str(exc)
    if isinstance(exc, Unauthorized):
        return f"not authorized: {message}"
    if isinstance(exc, Forbidden):
        return f"not allowed: {message}"
    if isinstance(exc, Unavailable | UsageError):
        return message
    if isinstance(exc, ProtocolError):
        return f"{exc.code}: {message}"
    return message


def _print_error(message: str) -> None:
    print(f"quicksilver: error: {message}", file=sys.stderr, flush=True)


def _client_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="quicksilver: %(message)s")


# --- serve --------------------------------------------------------------------------------------


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        help="run the broker, the HTTP API and the web UI",
        description="Run the broker, the HTTP API and the web UI on one port. Every flag "
        "overrides the matching QUICKSILVER_* environment variable.",
    )
    p.add_argument("--host", help="address to listen on (env QUICKSILVER_HOST; default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=_port,
        help="TCP port to listen on (env PORT or QUICKSILVER_PORT; default 8000)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="directory for the SQLite database and the signing secret "
        f"(env QUICKSILVER_DATA_DIR; default {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--database-url",
        help="PostgreSQL URL to use instead of SQLite (env QUICKSILVER_DATABASE_URL)",
    )
    p.add_argument(
        "--redis-url",
        help="Redis URL of the backplane between several broker nodes (env QUICKSILVER_REDIS_URL)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="a browser Origin allowed besides same-origin, '*' for all; repeat for several "
        "(env QUICKSILVER_ALLOWED_ORIGINS, comma-separated)",
    )
    p.add_argument(
        "--no-anonymous",
        action="store_true",
        help="refuse clients without a token (env QUICKSILVER_ALLOW_ANONYMOUS=false)",
    )
    p.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help="logging level (env QUICKSILVER_LOG_LEVEL; default info)",
    )
    p.set_defaults(handler=cmd_serve)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (flags not given are left to the environment)."""
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir", "database_url", "redis_url", "log_level"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.allow_origin:
        overrides["allowed_origins"] = tuple(args.allow_origin)
    if args.no_anonymous:
        overrides["allow_anonymous"] = False
    return overrides


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.config import Settings

    try:
        settings = Settings.from_env(os.environ, **serve_overrides(args))
    except ValueError as exc:
        _usage(str(exc))
    from broker.server import run

    run(settings)
    return EXIT_OK


# --- token --------------------------------------------------------------------------------------


def _add_token(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "token",
        help="print a signed JWT",
        description="Print one signed JWT on stdout. HS256 tokens are signed with "
        "QUICKSILVER_SECRET, else with the secret file in the data directory (created when "
        "missing, so 'serve' with the same data directory accepts the token).",
    )
    p.add_argument("--sub", required=True, help="the token's subject (who it is for)")
    p.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help="admin, publisher, subscriber or worker; repeat for several",
    )
    p.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a topic pattern the token may publish to; repeat for several",
    )
    p.add_argument(
        "--subscribe",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a topic pattern the token may subscribe to; repeat for several",
    )
    p.add_argument(
        "--queue",
        action="append",
        metavar="NAME",
        help="a queue the token may enqueue to or work on; repeat for several "
        "(default: no queue limit)",
    )
    p.add_argument(
        "--ttl",
        type=_non_negative_int,
        default=3600,
        help="seconds until the token expires; 0 for a token that never expires (default 3600)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="directory holding the signing secret "
        f"(env QUICKSILVER_DATA_DIR; default {DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--private-key-file",
        type=Path,
        help="PEM private key to sign with instead of the secret; needs --algorithm "
        "(env QUICKSILVER_PRIVATE_KEY_FILE)",
    )
    p.add_argument(
        "--algorithm",
        help="signing algorithm: HS256 (default) with the secret, RS256 or ES256 with "
        "--private-key-file",
    )
    p.set_defaults(handler=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from auth.tokens import (
        ASYMMETRIC_ALGORITHMS,
        HMAC_ALGORITHMS,
        ROLES,
        SECRET_FILE,
        Secret,
        load_or_create_secret,
        mint_token,
        secret_from_env,
    )

    for role in args.role:
        if role not in ROLES:
            _usage(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    for option, patterns in (("--publish", args.publish), ("--subscribe", args.subscribe)):
        for pattern in patterns:
            try:
                parse_pattern(pattern)
            except BadRequest as exc:
                _usage(f"{option}: {exc.message}")
    for queue in args.queue or ():
        if not queue or len(queue) > MAX_QUEUE_NAME:
            _usage(f"--queue: invalid queue name {queue!r} (1 to {MAX_QUEUE_NAME} characters)")
    if not args.sub:
        _usage("--sub must not be empty")

    key_file: Path | None = args.private_key_file
    if key_file is None and _env("PRIVATE_KEY_FILE"):
        key_file = Path(str(_env("PRIVATE_KEY_FILE")))
    algorithm: str = args.algorithm or ("HS256" if key_file is None else "")
    key: Secret | str
    if key_file is not None:
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            _usage("--private-key-file needs --algorithm RS256 or ES256")
        try:
            key = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read the private key {key_file}: {exc}") from None
    else:
        if algorithm not in HMAC_ALGORITHMS:
            _usage(f"--algorithm {algorithm} needs --private-key-file")
        secret = secret_from_env(os.environ)
        if secret is None:
            data_dir = args.data_dir or Path(_env("DATA_DIR") or DEFAULT_DATA_DIR)
            try:
                secret, created = load_or_create_secret(data_dir)
            except OSError as exc:
                raise CommandError(
                    f"cannot read or create the secret in {data_dir}: {exc}"
                ) from None
            if created:
                print(
                    f"quicksilver: created a new signing secret {data_dir / SECRET_FILE}; "
                    f"'quicksilver serve --data-dir {data_dir}' accepts tokens signed with it",
                    file=sys.stderr,
                )
        key = secret

    token = mint_token(
        key,
        sub=args.sub,
        roles=args.role,
        publish=args.publish,
        subscribe=args.subscribe,
        queues=args.queue,
        ttl=args.ttl or None,
        algorithm=algorithm,
    )
    print(token)
    return EXIT_OK


# --- publish ------------------------------------------------------------------------------------


def _add_publish(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "publish",
        help="publish one message and print its offset",
        description="Publish one JSON value on a topic and print the message's offset.",
    )
    p.add_argument("topic", metavar="TOPIC", help="the exact topic to publish on")
    p.add_argument("json", metavar="JSON", help="the message data as JSON; '-' reads it from stdin")
    _add_client_options(p)
    p.set_defaults(handler=cmd_publish)


def parse_json_argument(text: str) -> Any:
    """The JSON value of a command-line argument; raises :class:`CommandError` (exit 2)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        _usage(f"JSON is not valid: {exc}")
    try:
        check_portable(value)
    except BadRequest as exc:
        _usage(f"JSON cannot be published: {exc.message}")
    return value


async def _publish(url: str, token: str | None, topic: str, data: Any, limit: float) -> int:
    from .client import Client

    async with Client(
        url, token, reconnect=False, open_timeout=limit, request_timeout=limit
    ) as client:
        return await client.publish(topic, data)


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        parse_topic(args.topic)
    except BadRequest as exc:
        _usage(exc.message)
    text = sys.stdin.read() if args.json == "-" else args.json
    data = parse_json_argument(text)
    _client_logging()
    offset = asyncio.run(_publish(_url(args), _token(args), args.topic, data, args.timeout))
    print(offset, flush=True)
    return EXIT_OK


# --- subscribe ----------------------------------------------------------------------------------


def _add_subscribe(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "subscribe",
        help="print the messages of a topic pattern, one JSON line each",
        description="Print every message matching PATTERN as one JSON line (topic, offset, "
        "epoch, ts, data). Reconnects when the connection drops and, on an exact topic, "
        "resumes after the last message printed. Ctrl-C stops.",
    )
    p.add_argument("pattern", metavar="PATTERN", help="a topic or a pattern with * and **")
    _add_client_options(p)
    p.add_argument(
        "--since-offset",
        type=_non_negative_int,
        metavar="N",
        help="first print the messages after offset N from the topic's history "
        "(exact topics only; needs --epoch)",
    )
    p.add_argument("--epoch", metavar="E", help="the topic epoch that --since-offset refers to")
    p.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="exit after N messages (default: run until interrupted)",
    )
    p.set_defaults(handler=cmd_subscribe)


def message_line(message: Message) -> str:
    """The JSON line ``subscribe`` prints for one message."""
    return json.dumps(
        {
            "topic": message.topic,
            "offset": message.offset,
            "epoch": message.epoch,
            "ts": message.ts,
            "data": message.data,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def subscribe_since(args: argparse.Namespace) -> Since | None:
    """The ``since`` of the ``subscribe`` arguments; raises :class:`CommandError` (exit 2)."""
    if (args.since_offset is None) != (args.epoch is None):
        _usage("--since-offset and --epoch go together")
    if args.since_offset is None:
        return None
    if not is_exact(args.pattern):
        _usage("--since-offset needs an exact topic, not a pattern with wildcards")
    return Since(offset=args.since_offset, epoch=args.epoch)


async def _subscribe(
    url: str,
    token: str | None,
    pattern: str,
    since: Since | None,
    count: int | None,
    limit: float,
    write: Callable[[str], None],
) -> None:
    from .client import Client

    async with Client(url, token, open_timeout=limit, request_timeout=limit) as client:
        subscription = await client.subscribe(pattern, since)
        seen = 0
        async for message in subscription:
            write(message_line(message))
            seen += 1
            if count is not None and seen >= count:
                return
        # Iteration ends without an error only when the client was closed.


def _write_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_subscribe(args: argparse.Namespace) -> int:
    try:
        parse_pattern(args.pattern)
    except BadRequest as exc:
        _usage(exc.message)
    since = subscribe_since(args)
    _client_logging()
    try:
        asyncio.run(
            _subscribe(
                _url(args),
                _token(args),
                args.pattern,
                since,
                args.count,
                args.timeout,
                _write_line,
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep the interpreter's final
        # flush from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK


# --- worker -------------------------------------------------------------------------------------


def _add_worker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "worker",
        help="run a worker process that takes jobs from the broker",
        description="Connect to the broker, join the worker pool for the given queues and run "
        "their jobs with the built-in handlers and those of --app modules.",
    )
    _add_client_options(p)
    p.add_argument(
        "--queue",
        action="append",
        metavar="NAME",
        help="a queue to take jobs from; repeat for several (env QUICKSILVER_QUEUES, "
        "comma-separated; default: every queue with a registered handler)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        help="jobs run at once (env QUICKSILVER_CONCURRENCY; default 4)",
    )
    p.add_argument(
        "--app",
        action="append",
        metavar="MODULE",
        help="a Python module to import that registers job handlers; repeat for several "
        "(env QUICKSILVER_APPS, comma-separated)",
    )
    p.add_argument(
        "--burst",
        action="store_true",
        help="exit once the queues are empty instead of waiting for more jobs",
    )
    p.set_defaults(handler=cmd_worker)


def worker_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments for ``workers.runtime.run_worker``; raises :class:`CommandError`.

    ``concurrency`` is left out when neither the flag nor the environment gives it, so the
    runtime's own default applies.
    """
    token = _token(args)
    if token is None:
        _usage("a worker needs a token with the worker role: --token or QUICKSILVER_TOKEN")
    options: dict[str, Any] = {
        "url": _url(args),
        "token": token,
        "queues": tuple(args.queue or _env_list("QUEUES")),
        "apps": tuple(args.app or _env_list("APPS")),
        "burst": bool(args.burst),
    }
    concurrency = args.concurrency
    raw = _env("CONCURRENCY")
    if concurrency is None and raw is not None:
        try:
            concurrency = _positive_int(raw)
        except argparse.ArgumentTypeError as exc:
            _usage(f"QUICKSILVER_CONCURRENCY: {exc}")
    if concurrency is not None:
        options["concurrency"] = concurrency
    return options


def cmd_worker(args: argparse.Namespace) -> int:
    options = worker_options(args)
    try:
        runtime = importlib.import_module("workers.runtime")
    except ImportError as exc:
        raise CommandError(f"the worker runtime cannot be loaded: {exc}") from None
    run_worker = getattr(runtime, "run_worker", None)
    if not callable(run_worker):
        raise CommandError("the worker runtime has no run_worker()")
    result = run_worker(**options)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result if isinstance(result, int) else EXIT_OK


async def _await(awaitable: Any) -> Any:
    return await awaitable


# --- replay -------------------------------------------------------------------------------------


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number per second: {text}")
    return value


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "replay",
        help="post realistic CPAN Testers reports to a running broker",
        description="Record the uploads of an invented CPAN (about 50 distributions by 20 "
        "authors; needs a token that may publish on uploads/**), then post test reports with "
        "realistic grades, Perls and operating systems to /v3/report at a steady rate, with a "
        "progress bar on stderr. Runs until --count reports or --duration seconds, or until "
        "interrupted. --url may be the broker's ws:// URL or its http:// address.",
    )
    _add_client_options(p)
    p.add_argument("--rate", type=_rate, default=5.0, help="reports per second (default 5)")
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N reports")
    p.add_argument(
        "--duration", type=_positive_float, metavar="SECONDS", help="stop after this long"
    )
    p.add_argument(
        "--connections", type=_positive_int, default=8, help="HTTP connections (default 8)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the invented traffic (default 1)")
    p.add_argument("--no-uploads", action="store_true", help="post reports only")
    p.set_defaults(handler=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    from broker.cpantesters.replay import HttpError, http_base_url, replay

    try:
        base = http_base_url(_url(args))
    except ValueError as exc:
        _usage(str(exc))
    token = _token(args)
    uploads = not args.no_uploads
    if uploads and token is None:
        print("quicksilver: no token: uploads are not recorded", file=sys.stderr)
        uploads = False
    try:
        stats = asyncio.run(
            replay(
                base,
                token=token,
                rate=args.rate,
                count=args.count,
                duration=args.duration,
                connections=args.connections,
                seed=args.seed,
                uploads=uploads,
            )
        )
    except HttpError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    if stats.sent and not stats.accepted and not stats.duplicates:
        raise CommandError(f"no report was accepted: {stats.last_error}")
    return EXIT_OK


# --- webhook ------------------------------------------------------------------------------------


def _add_webhook(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "webhook",
        help="register, list and remove webhooks (admin token)",
        description="Manage webhooks through the broker's HTTP API: every message on a topic "
        "pattern is POSTed to a URL, signed with HMAC-SHA256. Needs an admin token.",
    )
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="POST every message matching PATTERN to TARGET",
        description="Register a webhook and print it as JSON. Without --secret a signing "
        "secret is generated and printed this once; it is never shown again.",
    )
    add.add_argument("target", metavar="TARGET", help="the http:// or https:// URL to POST to")
    add.add_argument("pattern", metavar="PATTERN", help="the topic pattern, e.g. 'reports/**'")
    add.add_argument(
        "--secret",
        help="signing secret, 16 to 1024 characters (env QUICKSILVER_WEBHOOK_SECRET; "
        "default: generated)",
    )
    add.add_argument("--max-attempts", type=_positive_int, help="attempts before a delivery fails")
    add.add_argument("--description", help="a note for operators")
    list_ = actions.add_parser("list", help="print the webhooks, one JSON line each")
    remove = actions.add_parser(
        "remove", help="remove a webhook; its unfinished deliveries are cancelled"
    )
    remove.add_argument("id", metavar="ID", help="the webhook's id")
    for sub, action in ((add, "add"), (list_, "list"), (remove, "remove")):
        _add_client_options(sub)
        sub.set_defaults(handler=cmd_webhook, webhook_action=action)


def _http_base(url: str) -> str:
    """``http(s)://host:port`` of the broker named by a ``ws(s)://`` or ``http(s)://`` URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        _usage(f"--url must be a ws://, wss://, http:// or https:// URL, not {url!r}")
    return f"{scheme}://{parts.netloc}"


def _api_call(method: str, url: str, token: str, body: Any = None, timeout: float = 10.0) -> Any:
    """One HTTP API request; the decoded JSON answer (None for an empty one). Failures raise
    :class:`CommandError` with the server's message."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["errors"][0]["message"]
        except Exception:
            message = exc.reason
        raise CommandError(f"HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CommandError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    return json.loads(raw) if raw else None


def cmd_webhook(args: argparse.Namespace) -> int:
    token = _token(args)
    if token is None:
        _usage("managing webhooks needs an admin token (--token or QUICKSILVER_TOKEN)")
    base = _http_base(_url(args)) + "/api/v1/webhooks"
    if args.webhook_action == "add":
        body: dict[str, Any] = {"url": args.target, "pattern": args.pattern}
        secret = args.secret or _env("WEBHOOK_SECRET")
        if secret is not None:
            body["secret"] = secret
        if args.max_attempts is not None:
            body["max_attempts"] = args.max_attempts
        if args.description is not None:
            body["description"] = args.description
        created = _api_call("POST", base, token, body, args.timeout)
        print(json.dumps(created, ensure_ascii=False), flush=True)
    elif args.webhook_action == "list":
        for hook in _api_call("GET", base, token, timeout=args.timeout)["webhooks"]:
            print(json.dumps(hook, ensure_ascii=False), flush=True)
    else:
        from urllib.parse import quote

        _api_call("DELETE", f"{base}/{quote(args.id, safe='')}", token, timeout=args.timeout)
    return EXIT_OK


# --- entry point --------------------------------------------------------------------------------

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_serve,
    _add_token,
    _add_publish,
    _add_subscribe,
    _add_worker,
    _add_webhook,
    _add_replay,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quicksilver",
        description="Authenticated real-time WebSocket broker with a durable job queue.",
    )
    parser.add_argument(
        "--version", action="version", version=f"quicksilver {__version__}", help="print version"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises for expected failures)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse has printed the usage error (status 2) or the help (status 0).
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CommandError as exc:
        _print_error(str(exc))
        return exc.status
    except UsageError as exc:
        _print_error(_describe(exc))
        return EXIT_USAGE
    except QuicksilverError as exc:
        _print_error(_describe(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
