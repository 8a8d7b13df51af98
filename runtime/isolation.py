"""Which confinement layers this machine supports, and whether that is enough to start.

The probe (sandbox.confine.probe) forks throwaway children and tries each layer for real, so
it costs ~0.1-0.3 s; what a kernel supports does not change while a process runs, so the
answer is kept for the process's life.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

from runtime.config import SandboxConfig
from runtime.errors import ConfigError
from sandbox.confine import LAYERS, LayerStatus, probe

logger = logging.getLogger(__name__)


@functools.cache
def probe_layers(worker_uid: int) -> Mapping[str, LayerStatus]:
    return probe(drop_to_uid=worker_uid)


def check_required(statuses: Mapping[str, LayerStatus], sandbox: SandboxConfig) -> None:
    missing = [layer for layer in sandbox.require if not statuses[layer].active]
    if missing:
        reasons = "; ".join(f"{layer}: {statuses[layer].detail}" for layer in missing)
        raise ConfigError(
            f"required sandbox layer(s) unavailable here: {reasons}. valrun will not run "
            "untrusted code with weaker isolation than configured. To accept that, remove "
            f"{', '.join(missing)} from [sandbox] require in valrun.toml."
        )


def log_table(statuses: Mapping[str, LayerStatus]) -> None:
    width = max(map(len, LAYERS))
    for layer in LAYERS:
        status = statuses[layer]
        state = "active" if status.active else "UNAVAILABLE"
        logger.info("sandbox layer %-*s %-11s %s", width, layer, state, status.detail)


def health(statuses: Mapping[str, LayerStatus]) -> dict[str, dict[str, object]]:
    """The /healthz view: each layer, whether it is in force, and what it does here."""
    return {
        layer: {"active": statuses[layer].active, "detail": statuses[layer].detail}
        for layer in LAYERS
    }
