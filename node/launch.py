"""What both of the node's processes need to start the same way: the settings (file + environment + flags, resolved
once by the receiving process and handed to every worker it starts), logging, the models, and the rule for a SIGHUP
reload (the one time a process reads the file again)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import ConfigError, Settings, load_settings, with_command_line_peers

if TYPE_CHECKING:  # the receiving process never loads torch; only the worker process does
    from models import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """How `cxrnode serve` was started: enough to build its Settings again, which a SIGHUP reload does."""

    config_path: Path | None
    overrides: Mapping[str, object] = field(default_factory=dict)
    destinations: tuple[str, ...] = ()
    allowed_calling_aes: tuple[str, ...] = ()

    def settings(self) -> Settings:
        return with_command_line_peers(
            load_settings(self.config_path, overrides=self.overrides), self.destinations, self.allowed_calling_aes
        )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("pynetdicom", "highdicom", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_predictor(settings: Settings) -> Predictor:
    """The models, with the configured thresholds in place of those recorded with the weights."""
    from models import Predictor, Thresholds  # here, not at the top: only the worker process pays for torch

    inference = settings.inference
    predictor = Predictor.load(inference.weights, device=inference.device)
    recorded = predictor.thresholds
    predictor.thresholds = Thresholds(
        score=recorded.score if inference.score_threshold is None else inference.score_threshold,
        mask=recorded.mask if inference.mask_threshold is None else inference.mask_threshold,
        present=recorded.present if inference.present_threshold is None else inference.present_threshold,
        severity_mask=(
            recorded.severity_mask if inference.severity_mask_threshold is None else inference.severity_mask_threshold
        ),
    )
    return predictor


def reloaded(launch: Launch, running: Settings) -> Settings | None:
    """The settings after a SIGHUP: peers, routing, filters, outputs, sender and TLS from the file again; [node],
    [inference], [http] and [queue] as they are (those need a restart). None, and the running settings kept, when
    the file is now invalid."""
    try:
        new = launch.settings()
    except ConfigError as error:
        log.error("reload refused, keeping the running configuration:\n%s", error)
        return None
    for section in ("node", "inference", "http", "queue"):
        if getattr(new, section) != getattr(running, section):
            log.warning("reload: changes in [%s] take effect after a restart", section)
    new = new.model_copy(
        update={"node": running.node, "inference": running.inference, "http": running.http, "queue": running.queue}
    )
    log.info(
        "reload: %d peer(s), default route %s, %d rule(s)",
        len(new.peers),
        new.routing.default or "results folder",
        len(new.routing.rules),
    )
    return new
