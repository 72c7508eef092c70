"""What every part of :class:`cloud_hub.store.HubStore` shares."""

from __future__ import annotations

from sqlalchemy.engine import Engine


class StoreBase:
    """The engine every domain part of the hub store reads and writes through."""

    engine: Engine
