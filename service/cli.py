"""``atop serve``: every setting is a flag (``--max-batch-size``) and an environment variable
(``ATOP_MAX_BATCH_SIZE``); flags win. With no arguments it serves the newest valid version of
``cifar10-atop`` from the embedded store on 127.0.0.1:8000."""

from __future__ import annotations

import argparse
import logging
import os
import types
import typing
from pathlib import Path

from pydantic import SecretStr

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


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then the flags given on the command line; fails on invalid values."""
    given = {k: getattr(args, k) for k in Settings.model_fields if getattr(args, k, None) is not None}
    return Settings(**given)


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

    settings = settings_from_args(args)
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
        uvicorn.run("service.app:worker_app", factory=True, workers=settings.workers, **common)
    return 0
