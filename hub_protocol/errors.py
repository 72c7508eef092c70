"""The error classes the contract raises, classified by what the caller should do.

::

    Error               base of everything raised on purpose (the edge's ``EdgeError``)
    ├── TransientError  retry later; nothing is wrong with the input
    ├── PermanentError  the input is bad; retrying will not help: tell a person
    │   └── manifest.ManifestError
    └── UntrustedError  reject and alert (tampered package, bad signature)
        └── package.PackageError

The edge's error tree grows from these classes (its root is ``EdgeError``), so a package that
fails verification is classified the same way on the edge and in the ops tooling.
"""

from __future__ import annotations


class Error(Exception):
    """Base class for every error raised on purpose."""


class TransientError(Error):
    """Retrying later may succeed."""


class PermanentError(Error):
    """The input is bad; retrying the same input will fail the same way."""


class UntrustedError(Error):
    """Input failed a trust check: reject it and alert."""
