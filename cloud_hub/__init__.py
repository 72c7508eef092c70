"""Cloud hub: the central service edge agents sync with (sites, sync endpoints, releases)."""

__version__ = "0.1.0"
