"""Service settings: environment variables ``ATOP_<NAME>`` and the ``atop serve`` flags.

Read once through the cached ``get_settings()``, the default of ``create_app``, which keeps them
in ``app.state`` for the routes' ``SettingsDep`` (tests pass a ``Settings`` to ``create_app``).
Invalid values fail at startup with a one-line error, never at the first request.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATOP_", frozen=True, extra="ignore")

    # where and what to serve
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    workers: int = Field(
        1, ge=1, le=64, description="uvicorn worker processes, each with its own model and batcher"
    )
    store: Path | None = Field(None, description="model store root")
    model_name: str = Field("cifar10-atop", min_length=1, description="model name in the store")
    pin_version: int | None = Field(
        None, ge=1, description="serve exactly this version (default: the newest valid one)"
    )
    wait_for_model: bool = Field(
        False,
        description="start even when no version loads: not ready (503) until the watcher finds "
        "one (default: fail at startup)",
    )
    poll_interval_s: float = Field(
        10.0, ge=0, description="seconds between store scans for new versions (0 = never)"
    )
    backend: Literal["onnx", "torchscript"] = Field(
        "onnx", description="inference backend (torchscript needs torch installed)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when the backend has it, CPU otherwise"
    )
    # ONNX Runtime
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0 = ORT's choice)")
    inter_op_threads: int = Field(0, ge=0, description="ORT inter-op threads (0 = ORT's choice)")
    spinning: bool = Field(
        False,
        description="let ORT threads spin between ops (off: measured faster on 2 cores, where a"
        " spinning pool takes the CPU the event loop needs; docs/benchmarks.md)",
    )
    # dynamic batching, in cost units: one unit = one image x one EOT sample
    max_batch_size: int = Field(32, ge=1, le=4096, description="largest batch, in image-samples")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="longest wait for a batch to fill after its first request"
    )
    queue_size: int = Field(1024, ge=1, description="queued image-samples per model before requests get 429")
    deadline_ms: float = Field(10_000, gt=0, description="a request not answered within this gets 504")
    # request limits
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body (413)")
    max_pixels: int = Field(
        16_777_216, ge=1024, description="largest width x height of one image, checked before decoding"
    )
    max_images: int = Field(64, ge=1, description="most images in one request (413)")
    max_samples: int = Field(16, ge=1, le=256, description="cap on the EOT `samples` option")
    max_inspect_draws: int = Field(
        64, ge=1, description="most images x samples in one /inspect request (413): each draw is two PNGs"
    )
    max_top_k: int = Field(10, ge=1, description="cap on the `top_k` option")
    # auth
    api_key: SecretStr | None = Field(None, description="if set, /classify requires X-API-Key")
    admin_token: SecretStr | None = Field(
        None, description="if set, /v1/admin/* requires 'Authorization: Bearer <token>'"
    )
    # robustness gate for hot swaps, from the manifests' measured evaluation
    robustness_tolerance: float = Field(
        0.02,
        ge=0,
        le=1,
        description="automatic swaps refuse a candidate whose measured robust accuracy (same "
        "attack, norm and eps in both manifests) is more than this below the active version's "
        "(1 = no gate)",
    )
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.queue_size < self.max_batch_size:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be >= max_batch_size ({self.max_batch_size})"
            )
        for name in ("api_key", "admin_token"):
            secret = getattr(self, name)
            if secret is not None and len(secret.get_secret_value()) < 8:
                raise ValueError(f"{name} must be at least 8 characters when set")
        if self.wait_for_model and self.poll_interval_s <= 0:
            raise ValueError("wait_for_model needs a store watcher: set poll_interval_s > 0")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once."""
    return Settings()
