"""Whether the model servers have versions AVAILABLE, asked over their REST API.

`GET /v1/models/NAME/versions/V` (TF Serving's model status) answers
`{"model_version_status": [{"version": "V", "state": "AVAILABLE", ...}]}`, or
404 while the server does not know the version yet. Through a Kubernetes
Service each answer is one replica's, so an address counts only after
`confirmations` AVAILABLE answers in a row; a replica that has not loaded
the version when a label moves to it keeps its old labels and applies the
move at a later poll, once it has (TF Serving retries the config each poll).
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

AVAILABLE = "AVAILABLE"


class NotAvailable(RuntimeError):
    """A version that did not become AVAILABLE in time, or failed to load."""


@dataclasses.dataclass(frozen=True)
class Servers:
    """Where and how long to ask."""

    addresses: tuple[str, ...]  # REST HOST:PORT of each server, or of their Service
    timeout_seconds: float = 600.0
    confirmations: int = 3
    interval_seconds: float = 1.0


def parse_addresses(text: str | None) -> tuple[str, ...]:
    """`a:8501,b:8501` -> ("a:8501", "b:8501")."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def version_state(address: str, model: str, version: int, timeout: float = 10.0) -> tuple[str, str]:
    """(state, error message) of one version as the server at `address` reports it;
    ("UNKNOWN", why) when it does not know the version or does not answer."""
    url = f"http://{address}/v1/models/{model}/versions/{version}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            statuses = json.loads(reply.read()).get("model_version_status", [])
    except urllib.error.HTTPError as error:
        return "UNKNOWN", f"HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return "UNKNOWN", str(getattr(error, "reason", error))
    for status in statuses:
        if str(status.get("version")) == str(version):
            detail = status.get("status", {})
            failed = detail.get("error_code", "OK") not in ("OK", 0)
            return status.get("state", "UNKNOWN"), detail.get("error_message", "") if failed else ""
    return "UNKNOWN", "not in the answer"


def wait_until_available(servers: Servers, model: str, versions: Iterable[int],
                         announce: Callable[[str], None] = print) -> None:
    """Return once every server reports every version AVAILABLE; NotAvailable after the
    timeout, or at once when a version failed to load (END with an error)."""
    pending = {(address, version) for address in servers.addresses for version in versions}
    streak = dict.fromkeys(pending, 0)
    last: dict[tuple[str, int], str] = {}
    deadline = time.monotonic() + servers.timeout_seconds
    announce(f"waiting until {', '.join(servers.addresses)} report {model} version(s) "
             f"{', '.join(map(str, sorted(set(versions))))} {AVAILABLE}")
    while pending:
        for address, version in sorted(pending):
            state, error = version_state(address, model, version)
            if state == "END" and error:
                raise NotAvailable(f"version {version} of {model} failed to load on {address}: {error}")
            streak[address, version] = streak[address, version] + 1 if state == AVAILABLE else 0
            last[address, version] = state + (f" ({error})" if error else "")
            if streak[address, version] >= servers.confirmations:
                pending.discard((address, version))
        if pending and time.monotonic() > deadline:
            address, version = min(pending)
            raise NotAvailable(f"version {version} of {model} is not {AVAILABLE} on {address} after "
                               f"{servers.timeout_seconds:.0f} s (last answer: {last[address, version]})")
        if pending:
            time.sleep(servers.interval_seconds)
