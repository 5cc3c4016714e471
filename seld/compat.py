"""The private names of our dependencies, in one place. Reads and writes nothing.

The product uses a library's private name only where the library has no public way to do what we
need, and then only through this module: one function per private name, its import inside, so that
importing this module imports no library. tests/test_compat.py holds one test per name, checking it
exists and behaves as we rely on: after an upgrade a change fails there, naming the library and the
name, rather than somewhere in a study. One section per library.
"""

from __future__ import annotations

from typing import Any

# --- Ray ------------------------------------------------------------------------------------------------
# `ray up` checks a cluster launcher file before it starts anything, but Ray exposes no offline check:
# these are the two steps `ray up` runs (ray/autoscaler/_private/commands.py), used by
# seld.study.cluster.load_launcher_file.


def ray_prepare_launcher_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A launcher config as `ray up` sees it: the provider's defaults.yaml merged in, node types
    for the local provider, `max_workers` per node type
    (``ray.autoscaler._private.util.prepare_config``). Returns a new dict."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(raw)


def ray_validate_launcher_config(cfg: dict[str, Any]) -> None:
    """Ray's checks of a prepared launcher config: its JSON schema (unknown keys too), the head node
    type among the node types, the sum of `min_workers` within `max_workers`
    (``ray.autoscaler._private.util.validate_config``). Raises jsonschema's ValidationError or
    ValueError / RuntimeError with Ray's message."""
    from ray.autoscaler._private.util import validate_config

    validate_config(cfg)
