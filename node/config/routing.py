"""The routing policy: which peers receive the results of images sent by a calling AE, which result objects each
destination gets, and which calling AEs may send to us (``[[peers]]``, ``[routing]``, ``[outputs]`` in
``config/node.toml``). Plain functions of the settings; :class:`~node.config.schema.Settings` asks them in its methods
of the same names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.config.schema import Peer, Settings


def peer_by_ae(settings: Settings, calling_ae: str) -> Peer | None:
    """The peer with this AE title: one with may_send first (those are unique), else the first declared."""
    ae = calling_ae.strip(" ")
    matching = [p for p in settings.peers if p.ae_title == ae]
    return next((p for p in matching if p.may_send), matching[0] if matching else None)


def destinations_for(settings: Settings, calling_ae: str) -> list[Peer]:
    """The peers that receive results of images sent by *calling_ae*: its rule if one matches, else the default.

    An empty list means: write the results as files under :attr:`Settings.results_dir`.
    """
    ae = calling_ae.strip(" ")
    names = next((r.destinations for r in settings.routing.rules if r.calling_ae == ae), settings.routing.default)
    return [settings.peer(name) for name in names]


def objects_for(settings: Settings, peer: Peer | None) -> list[str]:
    """The result objects a destination gets (its own profile, else [outputs]); None = results as files."""
    return list(peer.objects) if peer is not None and peer.objects is not None else list(settings.outputs.objects)


def objects_to_write(settings: Settings, calling_ae: str) -> list[str]:
    """Every object any destination of this caller's results needs (or [outputs] when they go to files),
    in the order SEG, SR, GSPS, SC."""
    destinations = destinations_for(settings, calling_ae)
    wanted = {kind for peer in destinations or [None] for kind in objects_for(settings, peer)}
    return [kind for kind in ("SEG", "SR", "GSPS", "SC") if kind in wanted]


def allowed_calling_aes(settings: Settings) -> set[str] | None:
    """AE titles that may send to us, or None (any calling AE accepted) when no peer has may_send = true."""
    if not any(p.may_send for p in settings.peers):
        return None
    return {p.ae_title for p in settings.peers if p.may_send and p.ae_title}  # a DICOMweb-only peer has none
