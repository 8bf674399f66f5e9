"""Telling a local path from a Hugging Face Hub id, and failing fast when neither can be reached.

A mistyped local path that happens to look like ``org/name`` would otherwise be sent to the Hub,
where ``huggingface_hub`` retries for up to a minute before the real problem (the path does not
exist) is lost in a connection error. These checks run before anything is loaded.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

# What the Hub accepts as a repository id: "name" or "org/name", word characters, "-" and ".".
HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")
PROBE_TIMEOUT_S = 3.0
_reachable: bool | None = None


def looks_local(source: str) -> bool:
    """Whether ``source`` can only mean a local path.

    True when it starts with ``.``, ``/`` or ``~``, has more separators than one ``org/name``,
    is no valid hub id, or its first component exists here (``outputs/does-not-exist`` when
    ``outputs/`` is a local directory).
    """
    if source.startswith((".", "/", "~")) or "\\" in source or (os.altsep and os.altsep in source):
        return True
    if not HUB_ID.match(source) or ".." in source or "--" in source:
        return True
    return "/" in source and Path(source.split("/", 1)[0]).exists()


def nearest_existing(path: Path) -> Path | None:
    """The deepest ancestor of ``path`` (or ``path`` itself) that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def missing_path_message(what: str, source: str) -> str:
    """``what: 'path' does not exist`` plus the part of the path that does."""
    path = Path(source).expanduser()
    found = nearest_existing(path.absolute())
    # Where the path stops existing, unless that is just the working directory or the root.
    where = ""
    if found is not None and found not in (Path("/"), Path.cwd()):
        where = f" ({found} exists, {path.absolute().relative_to(found)} does not)"
    return f"{what} {source!r} does not exist{where}"


def hub_offline() -> bool:
    """Whether offline mode is on for the Hub libraries (``HF_HUB_OFFLINE=1`` or set by :func:`go_offline`)."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Switch transformers, datasets and huggingface_hub to offline mode in this process and its children."""
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the Hub endpoint (through the user's proxy settings), answered within
    ``timeout`` seconds; remembered for the process. Any HTTP answer counts as reachable."""
    global _reachable
    if _reachable is None:
        import huggingface_hub.constants
        from huggingface_hub.utils import get_session

        answer: list[bool] = []

        def probe() -> None:
            try:
                get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
                answer.append(True)
            except Exception:
                answer.append(False)

        # A daemon thread: a resolver that hangs past the timeout must not hold the run.
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 0.5)
        _reachable = bool(answer and answer[0])
    return _reachable


def offline_hint(what: str, source: str) -> str:
    return (
        f"{what} {source!r} is not a local path and the Hugging Face Hub cannot be reached (offline); "
        f"download it where the Hub is reachable (`hf download {source}`) and pass the local "
        f"directory or file instead (e.g. ./{source.rsplit('/', 1)[-1]})"
    )


def check_local(source: str, what: str) -> None:
    """A path that can only be local and does not exist fails now, in one line naming it, rather
    than after the Hub libraries have retried it as a repository id."""
    if not Path(source).expanduser().exists() and looks_local(source):
        raise FileNotFoundError(missing_path_message(what, source))


def check_source(source: str, what: str, *, cached: bool = False) -> None:
    """Fail fast on a source that cannot be loaded.

    A path that exists passes. One that looks local (see :func:`looks_local`) raises
    ``FileNotFoundError`` naming it. A hub id passes when the Hub answers; when it does not, the
    Hub libraries are switched to offline mode (so what is cached still loads) and, unless
    ``cached`` says the caller found it in the cache, ``ConnectionError`` says how to point at
    local files.
    """
    if Path(source).expanduser().exists():
        return
    check_local(source, what)
    if not hub_offline() and not hub_reachable():
        go_offline()
    if hub_offline() and not cached:
        raise ConnectionError(offline_hint(what, source))


def model_in_cache(repo_id: str) -> bool:
    """Whether the Hub cache holds a config of ``repo_id`` (a model or tokenizer downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except Exception:  # an id the cache cannot even name
            return False
    return False
