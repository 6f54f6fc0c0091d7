"""``atop serve``: every setting is a flag (``--max-batch-size``) and an environment variable
(``ATOP_MAX_BATCH_SIZE``); flags win. With no arguments it serves the newest valid version of
``cifar10-atop`` from the embedded store on 127.0.0.1:8000."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import types
import typing
from pathlib import Path

from pydantic import SecretStr, ValidationError

from service.settings import Settings

log = logging.getLogger("atop.service")


def _flag_type(annotation):
    """(argparse type, choices) for a settings field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    if annotation in (SecretStr, Path):
        return (str if annotation is SecretStr else Path), None
    return annotation, None


def add_arguments(p: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"ATOP_{name.upper()}"
        default = "the embedded store" if name == "store" else field.default
        if isinstance(default, SecretStr) or name in ("api_key", "admin_token"):
            default = "none"
        help_ = f"{field.description} [env {env}; default: {default}]"
        kind, choices = _flag_type(field.annotation)
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, type=kind, choices=choices, default=None, help=help_, dest=name)


class InvalidSettings(ValueError):
    """Settings that do not validate: ``problems`` holds one line for each, naming the flag or
    the environment variable that set the value (never a secret's value)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


_SECRETS = {
    n for n, f in Settings.model_fields.items() if SecretStr in (f.annotation, *typing.get_args(f.annotation))
}


def _problem(err: dict, given: dict) -> str:
    """One pydantic error as one line: where the value came from, then what is wrong with it."""
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    name = str(err["loc"][0]) if err.get("loc") else None
    if name not in Settings.model_fields:  # a check across settings (the model validator)
        return msg
    secret = name in _SECRETS
    if name in given:
        return f"--{name.replace('_', '-')}{'' if secret else ' ' + str(err.get('input'))}: {msg}"
    return f"ATOP_{name.upper()}{'' if secret else '=' + str(err.get('input'))}: {msg}"


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags given on the command line; invalid values raise
    ``InvalidSettings``, one line per problem."""
    given = {k: getattr(args, k) for k in Settings.model_fields if getattr(args, k, None) is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        raise InvalidSettings([_problem(err, given) for err in e.errors(include_url=False)]) from None


def check_port(host: str, port: int) -> None:
    """Fail at once, in one line, when ``host:port`` cannot be listened on (typically: another
    server has it), before anything loads, not after "Application startup complete". Binds as
    uvicorn does (SO_REUSEADDR, IPv6-only sockets) and closes at once; the port can still be
    taken between this check and uvicorn's bind, which then fails as before."""
    if port == 0:  # any free port
        return
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot listen on {where}: {e.strerror}; check --host") from None
    bound, unavailable = 0, None
    for family, kind, proto, _, addr in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(
                        f"cannot listen on {where}: the address is already in use (is another server"
                        " running there?); stop it or choose another --port"
                    ) from None
                # EADDRNOTAVAIL: that family is not enabled here; skipped, as asyncio does
                if e.errno == errno.EADDRNOTAVAIL:
                    unavailable = e
                    continue
                raise ValueError(f"cannot listen on {where}: {e.strerror}; check --host and --port") from None
            bound += 1
    if not bound and unavailable is not None:
        raise ValueError(f"cannot listen on {where}: {unavailable.strerror}; check --host")


def _export_env(settings: Settings) -> None:
    """Worker processes rebuild the settings from the environment."""
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        os.environ[f"ATOP_{name.upper()}"] = str(value)


def preflight(settings: Settings) -> None:
    """The common startup mistake (wrong store or model name) as one line, before uvicorn."""
    from model_store import store

    root = Path(settings.store) if settings.store else store.default_store()
    if settings.wait_for_model or store.list_versions(root, settings.model_name):
        return
    names = sorted({mv.name for mv in store.list_versions(root)})
    there = f"it holds: {', '.join(names)}" if names else "it holds no valid model"
    raise ValueError(
        f"no valid version of model {settings.model_name!r} in store {root} ({there}); "
        "check --store and --model-name, or pass --wait-for-model"
    )


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from service.logs import configure_logging

    try:
        settings = settings_from_args(args)
    except InvalidSettings as e:
        for problem in e.problems:
            log.error("invalid setting: %s", problem)
        return 2
    check_port(settings.host, settings.port)  # before the model loads: see check_port
    preflight(settings)
    configure_logging("debug" if getattr(args, "verbose", False) else settings.log_level, settings.log_format)
    common = dict(
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(5, int(settings.deadline_ms / 1000) + 1),
    )
    log.info(
        "starting on %s:%d (%s backend, %d worker(s))",
        settings.host,
        settings.port,
        settings.backend,
        settings.workers,
    )
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)
    else:
        _export_env(settings)
        _run_workers(
            uvicorn.Config("service.app:worker_app", factory=True, workers=settings.workers, **common)
        )
    return 0


def _run_workers(config) -> None:
    """uvicorn.run's multi-worker path, with TCP_NODELAY on the shared listening socket.

    uvicorn binds that socket itself with protocol 0, so asyncio does not set TCP_NODELAY on the
    connections the workers accept from it (it only does for IPPROTO_TCP sockets): the response
    then waits in Nagle's buffer for the client's delayed ACK, ~40 ms on every keep-alive request
    (measured: p50 48 ms at one client against 4.9 ms with one worker; a bare uvicorn app, 44 ms
    against 0.44). Linux copies the option from the listening socket to every accepted one.
    """
    import socket

    from uvicorn.supervisors import Multiprocess

    sock = config.bind_socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()
