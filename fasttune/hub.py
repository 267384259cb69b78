"""Is the Hugging Face hub reachable? Asked once per process, just before the first hub lookup.

Without a network, huggingface_hub 1.33 retries every lookup five times, waiting 1, 2, 4, 8 and 8 s
(``http_backoff`` in ``utils/_http.py``), before transformers or datasets fall back to the cache. So the first
time a verb is about to resolve a hub id, :func:`use_cache_if_unreachable` sends one request to
the configured endpoint (``HF_ENDPOINT``, huggingface_hub's ``constants.ENDPOINT``) with a short
timeout and no retries. If nothing answers, it says so in one line and switches this process (and
the processes it starts) to offline mode: what is cached loads, what is not fails at once with
fasttune's own message. Where offline mode is already on, nothing is asked.

Offline mode is read in three places (huggingface_hub 1.33.0, transformers 5.17.0, datasets 4.8.5):
``huggingface_hub.constants.HF_HUB_OFFLINE``, set from the environment when it is imported and
read at every request (transformers asks ``huggingface_hub.is_offline_mode()``, which returns it);
``datasets.config.HF_HUB_OFFLINE``, a copy taken when datasets is imported; and the environment,
for modules imported later and for child processes. All three are set.

Torch-free, and the request carries no token: only whether something answered matters.
"""
from __future__ import annotations

import os
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

from fasttune.errors import SourceUnavailable

TIMEOUT_S = 3.0
"""One attempt, this long: a reachable hub answers a HEAD in well under a second."""

_state: dict = {}
"""``checked`` once the question was asked in this process; ``reason`` when the answer was no."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable_reason(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when something at ``url`` answers (any HTTP status), else why nothing did.

    Only a failure to connect counts: an HTTP error status, or a TLS failure, means a server is
    there, and huggingface_hub is left to report on it. The request runs in a thread so that a
    slow name lookup (which the socket timeout does not cover) is bounded too.
    """
    outcome: list = []

    def ask() -> None:
        try:
            request = urllib.request.Request(_shown(url), method="HEAD", headers={"User-Agent": "fasttune-reachability-check"})
            with urllib.request.urlopen(request, timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except urllib.error.URLError as err:
            outcome.append(None if isinstance(err.reason, ssl.SSLError) else _describe(err.reason, timeout))
        except ssl.SSLError:
            outcome.append(None)
        except OSError as err:  # a timeout while reading, a reset connection
            outcome.append(_describe(err, timeout))
        except Exception:  # a malformed endpoint or answer: not a failure to connect; huggingface_hub will say more
            outcome.append(None)

    worker = threading.Thread(target=ask, name="fasttune-hub-check", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return f"no answer within {timeout:g} s" if worker.is_alive() else outcome[0]


def _describe(reason, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__


def use_cache_if_unreachable() -> bool:
    """Before a hub lookup: True when this process reads the local cache only (offline mode).

    Asks the endpoint once per process (see the module docstring); later calls return at once.
    """
    if offline_mode():
        return True
    if "checked" not in _state:
        _state["checked"] = True
        url = endpoint()
        _state["reason"] = reason = unreachable_reason(url)
        if reason is not None:
            print(f"hub: {_shown(url)} is not reachable from this machine ({reason}); "
                  "using the local cache only (HF_HUB_OFFLINE=1)", file=sys.stderr, flush=True)
            go_offline()
    return offline_mode()


def unreachable() -> bool:
    """Whether this process found the hub unreachable and went offline."""
    return _state.get("reason") is not None


def offline_reason() -> str | None:
    """Why this process reads the local cache only, in words; None where it may ask the hub."""
    if unreachable():
        return f"{_shown(endpoint())} is not reachable from this machine"
    return "HF_HUB_OFFLINE is set" if offline_mode() else None


def not_cached(what: str, name: str, key: str, err: Exception) -> SourceUnavailable:
    """The error for a hub id that offline mode could not find in the local cache (call where
    :func:`offline_reason` is not None): what is missing, why, and the two ways out."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return SourceUnavailable(f"{what} {name!r} is not in the local cache, and {offline_reason()} ({first_line}); "
                             f"connect this machine and run again, or download it where the hub is reachable "
                             f"(hf download {name} --local-dir DIR), copy DIR here and point {key} at it")


def go_offline() -> None:
    """Offline mode for this process and its children, wherever the libraries keep the switch."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def _shown(url: str) -> str:
    """The endpoint without any user:password part (never print a credential)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) \
        if parts.hostname else url
