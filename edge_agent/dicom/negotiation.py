"""Association negotiation: an A-ASSOCIATE-RQ PDU in, an A-ASSOCIATE-AC PDU or a rejection out.

The PDU is decoded with pynetdicom's item codecs and the presentation contexts negotiated
with its ``negotiate_as_acceptor``; everything a hostile or broken requestor can put in the
PDU is checked here first (length, protocol version, application context, context ids,
contexts without transfer syntaxes, user identity type), so a bad request always gets an
A-ASSOCIATE-RJ or an A-ABORT at once instead of an exception.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from edge_agent.dicom import pdu

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Our Implementation Class UID (a UUID-derived 2.25 UID, fixed for this product).
IMPLEMENTATION_CLASS_UID = "2.25.215834725716123401386325287766123930761"
IMPLEMENTATION_VERSION_NAME = "EDGE_AGENT_01"
MAX_ASSOCIATE_RQ_BYTES = 65_536  # a real A-ASSOCIATE-RQ with 128 contexts is ~15 kB

USER_IDENTITY_TYPES = {1: "username", 2: "username+passcode", 3: "kerberos", 4: "saml", 5: "jwt"}


@dataclass(frozen=True)
class Accepted:
    """An accepted association: what to send back and what was agreed."""

    ac_pdu: bytes
    contexts: dict[int, tuple[str, str]]  # context id -> (abstract syntax, transfer syntax)
    peer_max_pdu: int  # 0 = unlimited
    calling_ae: str
    called_ae: str
    user_identity: str
    peer_implementation: str


@dataclass(frozen=True)
class Rejected:
    """A-ASSOCIATE-RJ (result, source, reason) and the reason in words, for the audit."""

    rj: tuple[int, int, int]
    reason: str
    calling_ae: str = ""
    called_ae: str = ""
    user_identity: str = ""
    peer_implementation: str = ""


@dataclass(frozen=True)
class Request:
    """What the policy sees of a decoded request."""

    calling_ae: str
    called_ae: str
    user_identity: str
    peer_implementation: str
    contexts: list[PresentationContext] = field(default_factory=list)


#: Policy hook: ``(request) -> None`` to accept, or a Rejected to refuse.
Policy = Callable[[Request], Rejected | None]


def supported_contexts(
    abstract_syntaxes: Sequence[str], transfer_syntaxes: Sequence[str]
) -> list[PresentationContext]:
    """Our acceptor contexts: every abstract syntax with every transfer syntax (SCP role)."""
    out = []
    for i, uid in enumerate(abstract_syntaxes):
        cx = PresentationContext()
        cx.context_id = (2 * i + 1) % 256 or 1
        cx.abstract_syntax = UID(uid)
        cx.transfer_syntax = [UID(t) for t in transfer_syntaxes]
        cx.scp_role = True
        cx.scu_role = False
        out.append(cx)
    return out


def _user_identity(item: UserIdentityNegotiation) -> str:
    kind = USER_IDENTITY_TYPES[int(item.user_identity_type or 0)]
    primary = bytes(item.primary_field or b"")
    if kind.startswith("username"):
        name = primary.decode("utf-8", "replace")[:64]
        return f"{kind}:{name}"  # the passcode is never kept
    if kind == "jwt":  # the subject claim, unverified: for the audit trail only
        try:
            body = primary.split(b".")[1]
            claims = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
            sub = str(claims.get("sub", ""))[:64] if isinstance(claims, dict) else ""
        except (IndexError, ValueError, TypeError):
            sub = ""
        return f"jwt:{sub}" if sub else "jwt"
    return kind


def negotiate(
    raw: bytes,
    *,
    our_max_pdu: int,
    contexts: list[PresentationContext],
    policy: Policy,
) -> Accepted | Rejected:
    """Decide on an A-ASSOCIATE-RQ PDU (``raw``: header and body).

    Raises :class:`~edge_agent.dicom.pdu.PduError` when the PDU itself cannot be decoded
    (the caller answers A-ABORT).
    """
    rq = A_ASSOCIATE_RQ()
    try:
        rq.decode(raw)
        primitive = rq.to_primitive()
    except Exception as exc:  # pynetdicom raises anything from struct.error to KeyError
        raise pdu.PduError(f"A-ASSOCIATE-RQ cannot be decoded: {exc!r}"[:200]) from None
    calling = str(primitive.calling_ae_title or "").strip()
    called = str(primitive.called_ae_title or "").strip()
    if not rq.protocol_version & 0x0001:
        return Rejected(pdu.REJECT_PROTOCOL_VERSION, "protocol version not supported", calling)
    if str(primitive.application_context_name or "") != APPLICATION_CONTEXT:
        return Rejected(
            pdu.REJECT_APPLICATION_CONTEXT, "application context name not supported", calling
        )
    peer_max = 0
    impl_uid = impl_version = ""
    user = ""
    roles: dict[UID, tuple[bool | None, bool | None]] = {}
    for item in primitive.user_information or []:
        if isinstance(item, MaximumLengthNotification):
            peer_max = int(item.maximum_length_received or 0)
        elif isinstance(item, ImplementationClassUIDNotification):
            impl_uid = str(item.implementation_class_uid or "")
        elif isinstance(item, ImplementationVersionNameNotification):
            impl_version = str(item.implementation_version_name or "")
        elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            if item.sop_class_uid is not None:
                roles[UID(item.sop_class_uid)] = (item.scu_role, item.scp_role)
        elif isinstance(item, UserIdentityNegotiation):
            if int(item.user_identity_type or 0) not in USER_IDENTITY_TYPES:
                return Rejected(
                    pdu.REJECT_NO_REASON,
                    f"user identity type {item.user_identity_type} not supported",
                    calling,
                    called,
                )
            user = _user_identity(item)
    peer_impl = f"{impl_uid} {impl_version}".strip()
    proposed = list(primitive.presentation_context_definition_list or [])
    seen: set[int] = set()
    for cx in proposed:
        cid = int(cx.context_id or 0)
        if cid % 2 == 0 or cid in seen:
            raise pdu.PduError(f"presentation context id {cid} is even or repeated")
        seen.add(cid)
    if not proposed:
        return Rejected(pdu.REJECT_NO_REASON, "no presentation context proposed", calling, called)
    request = Request(calling, called, user, peer_impl, proposed)
    refusal = policy(request)
    if refusal is not None:
        return Rejected(refusal.rj, refusal.reason, calling, called, user, peer_impl)
    usable = [cx for cx in proposed if cx.transfer_syntax and cx.abstract_syntax]
    result, ac_roles = negotiate_as_acceptor(usable, contexts, roles or None)
    unusable = []
    for cx in proposed:
        if cx in usable:
            continue
        bad = PresentationContext()
        bad.context_id = cx.context_id
        bad.abstract_syntax = cx.abstract_syntax or UID("1.2")
        bad.transfer_syntax = [UID("1.2.840.10008.1.2")]  # present but not significant
        bad.result = 0x04 if not cx.transfer_syntax else 0x01  # no transfer syntax / no reason
        unusable.append(bad)
    accepted = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in result
        if cx.result == 0x00 and cx.context_id is not None and cx.transfer_syntax
    }
    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT)
    ac.calling_ae_title = primitive.calling_ae_title
    ac.called_ae_title = primitive.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = sorted(
        list(result) + unusable, key=lambda c: int(c.context_id or 0)
    )
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = our_max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ac.user_information = [max_len, impl, version, *ac_roles]
    ac_pdu = A_ASSOCIATE_AC()
    ac_pdu.from_primitive(ac)
    return Accepted(
        ac_pdu=ac_pdu.encode(),
        contexts=accepted,
        peer_max_pdu=peer_max,
        calling_ae=calling,
        called_ae=called,
        user_identity=user,
        peer_implementation=peer_impl,
    )
