"""Sites: one-time enrollment tokens traded for a site id and credential, authentication,
the site list and each site's last heartbeat."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from cloud_hub.store.base import StoreBase
from cloud_hub.store.schema import enrollment_tokens, sites


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class AuthError(Exception):
    """Bad or missing credential / token (HTTP 401)."""


@dataclass(frozen=True)
class Enrolled:
    site_id: str
    credential: str


class SitesStore(StoreBase):
    """Enrollment, authentication and the site list."""

    def create_enrollment_token(
        self, site_name: str, *, ttl_s: float = 7 * 86400, now: float | None = None
    ) -> str:
        """A one-time token for ops to hand to a new site (stored hashed)."""
        now = time.time() if now is None else now
        # prefixed: a token starting with "-" would read as an option on a command line
        token = "enroll_" + secrets.token_urlsafe(32)
        with self.writing() as conn:
            conn.execute(
                enrollment_tokens.insert().values(
                    token_sha256=_sha(token),
                    site_name=site_name,
                    created_at=now,
                    expires_at=now + ttl_s,
                )
            )
        return token

    def enroll(self, token: str, *, now: float | None = None) -> Enrolled:
        """Trade a one-time token for a site id and its own credential. A used, unknown or
        expired token raises AuthError (a replayed token never enrolls twice)."""
        now = time.time() if now is None else now
        with self.writing() as conn:
            row = (
                conn.execute(
                    sa.select(enrollment_tokens).where(
                        enrollment_tokens.c.token_sha256 == _sha(token)
                    )
                )
                .mappings()
                .first()
            )
            if row is None or row["used_at"] is not None or row["expires_at"] < now:
                raise AuthError("enrollment token unknown, already used or expired")
            site_id = "site-" + secrets.token_hex(8)
            credential = secrets.token_urlsafe(32)
            # the conditional update makes a concurrent replay lose the race
            used = conn.execute(
                enrollment_tokens.update()
                .where(
                    enrollment_tokens.c.token_sha256 == _sha(token),
                    enrollment_tokens.c.used_at.is_(None),
                )
                .values(used_at=now, site_id=site_id)
            )
            if used.rowcount != 1:
                raise AuthError("enrollment token already used")
            conn.execute(
                sites.insert().values(
                    site_id=site_id,
                    name=row["site_name"],
                    credential_sha256=_sha(credential),
                    enrolled_at=now,
                )
            )
        return Enrolled(site_id, credential)

    def authenticate(self, credential: str) -> str:
        """The site id a credential belongs to; AuthError otherwise."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sites.c.site_id).where(sites.c.credential_sha256 == _sha(credential))
            ).first()
        if row is None:
            raise AuthError("unknown credential")
        return str(row[0])

    def list_sites(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    sa.select(
                        sites.c.site_id,
                        sites.c.name,
                        sites.c.enrolled_at,
                        sites.c.last_seen_at,
                        sites.c.health,
                    ).order_by(sites.c.enrolled_at)
                ).mappings()
            ]

    def heartbeat(self, site_id: str, health: dict[str, Any], *, now: float | None = None) -> None:
        with self.writing() as conn:
            conn.execute(
                sites.update()
                .where(sites.c.site_id == site_id)
                .values(
                    last_seen_at=time.time() if now is None else now,
                    health=json.dumps(health, sort_keys=True),
                )
            )
