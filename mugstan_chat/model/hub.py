"""Fail fast, in one line, when a hub model cannot be had: offline and not in the cache.

Why: without a network the hub client retries every file for minutes before
failing. One short probe (or the hub client's offline mode) decides first whether
to download, to load from the cache only, or to stop with a message that names
``--demo`` and ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0  # connect + DNS; the hub answers in well under a second when reachable
_TRUE = ("1", "on", "yes", "true")
_EXAMPLE_ID = "llava-hf/llava-1.5-7b-hf"


class HubUnavailable(Exception):
    """The model is neither local, nor cached, nor downloadable now; the message says what to do."""


def offline_mode() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub; any HTTP answer counts. Bounded by ``timeout_s``, DNS included.

    Why a thread: ``urlopen``'s timeout does not cover name resolution, which can
    block much longer than the connection on a machine without a network.
    """
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout_s).close()
            answer.append(True)
        except urllib.error.HTTPError:  # the hub answered (e.g. 4xx behind a proxy): it is reachable
            answer.append(True)
        except Exception as error:  # noqa: BLE001 - DNS failure, refused, timeout, TLS: unreachable
            logger.debug("hub probe failed: %s", error)
            answer.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answer and answer[0])


def is_cached(repo_id: str) -> bool:
    """Whether the model's config is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id, unreadable cache: treat as not cached
        return False


def resolve_hub_access(name: str, probe=None) -> bool:
    """Decides how ``from_pretrained(name)`` may run; returns ``local_files_only``.

    A local directory or an offline-mode run with the model cached: no network
    (True). A reachable hub: the usual download/revalidation (False). A cached model
    with the hub unreachable: the cache only (True).

    Args:
        probe: callable returning whether the hub answers (default :func:`hub_reachable`).

    Raises:
        HubUnavailable: the model is not cached and the hub is off (offline mode or unreachable).
    """
    if os.path.isdir(name):
        return True
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise HubUnavailable(f"no such directory {name} (and it is not a hub id such as {_EXAMPLE_ID})")
    cached = is_cached(name)
    if offline_mode():
        if cached:
            return True
        raise HubUnavailable(
            f"HF_HUB_OFFLINE is set and {name} is not in the Hugging Face cache; "
            "pass --demo for the offline demo model, or unset HF_HUB_OFFLINE to download the weights")
    if (probe or hub_reachable)():
        return False
    if cached:
        logger.warning("the Hugging Face Hub (%s) cannot be reached: loading %s from the cache", hub_endpoint(), name)
        return True
    raise HubUnavailable(
        f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached and {name} is not in the cache; "
        "pass --demo for the offline demo model, or download the weights first "
        "(then HF_HUB_OFFLINE=1 uses the cache without the network)")
