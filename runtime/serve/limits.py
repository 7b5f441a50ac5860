"""What one server accepts: batch and queue sizes, request sizes, time limits, the API key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ferry.errors import FerryError


@dataclass(frozen=True)
class ServeLimits:
    """The limits of a `ferry serve` process; a request beyond one gets a 4xx JSON error
    naming it (a full queue: 503 with Retry-After).

    Attributes:
        max_batch: requests (inputs) grouped into one backend call at most.
        max_wait_ms: how long the oldest waiting request waits for others to join its batch.
        max_join_wait_ms: continuous batching: how long a request waits for others to join a
            running batch with (a join runs the joiners' prompts and copies the batch's
            cache, so they join in groups: at once when they make a quarter of its rows).
        max_queue: inputs waiting at most; beyond, requests are refused with 503.
        max_body_bytes: the largest request body.
        max_inputs: inputs (texts) in one request at most.
        max_input_tokens: tokens of one input at most (None: the model's positions); longer
            inputs are refused unless the request asks for `truncation`.
        max_new_tokens: the largest `max_new_tokens` a request may ask for (also the default
            cap of `/v1/completions`' `max_tokens`).
        max_streams: streaming generations running at once.
        timeout_s: a request's time limit, queueing included (504 beyond).
        api_key: when set, every endpoint but /health and /ready needs
            `Authorization: Bearer <api_key>`.
        continuous: greedy or sampled generation runs as a streaming batch, each request
            answered as its rows end, a decoder-only model's taking waiting requests into its
            running batch between steps (continuous batching); False: one `generate` call per
            batch, at batch boundaries.
    """

    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_join_wait_ms: float = 100.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_inputs: int = 64
    max_input_tokens: int | None = None
    max_new_tokens: int = 512
    max_streams: int = 16
    timeout_s: float = 60.0
    api_key: str | None = None
    continuous: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "api_key":
                if value is not None and (not isinstance(value, str) or not value):
                    raise FerryError("api_key must be a non-empty string")
                continue
            if value is None and field.name == "max_input_tokens":
                continue
            if field.name == "continuous":
                if not isinstance(value, bool):
                    raise FerryError(f"serve setting continuous must be true or false, got "
                                     f"{value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FerryError(f"serve limit {field.name} must be a number, got {value!r}")
            if field.name == "timeout_s" and value <= 0:
                raise FerryError(f"serve limit timeout_s must be > 0, got {value}")
            low = {"max_wait_ms": 0, "max_join_wait_ms": 0, "timeout_s": 0}.get(field.name, 1)
            if value < low:
                raise FerryError(f"serve limit {field.name} must be ≥ {low}, got {value}")
