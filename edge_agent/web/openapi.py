"""The OpenAPI 3.1 document of ``/api/v1`` (and the probes and metrics), served at
``/api/v1/openapi.json``. Built from the route table, so a route cannot be missing from it
(a test checks both ways and validates the document)."""

from __future__ import annotations

from typing import Any

from edge_agent import __version__

_UID = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)*$", "maxLength": 64}
_USERNAME = {"type": "string", "pattern": "^[a-z][a-z0-9._-]{1,63}$"}
_RID = {"type": "string", "format": "uuid"}


def _q(name: str, schema: dict[str, Any], desc: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}


def _p(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
            },
        }
    },
}

#: (method, path) -> (summary, roles, parameters, request body schema, success status, type)
OPERATIONS: dict[tuple[str, str], tuple[str, tuple[str, ...], list[Any], Any, int, str]] = {
    ("GET", "/api/v1/studies"): (
        "Worklist: studies, critical first, newest first",
        ("radiologist",),
        [
            _q("q", {"type": "string", "maxLength": 100}, "patient name/ID, accession, UID"),
            _q("state", {"enum": ["RECEIVING", "COMPLETE", "INFERRING", "DONE", "FAILED"]}, ""),
            _q("modality", {"type": "string", "maxLength": 16}, ""),
            _q("critical", {"enum": ["true", "false"]}, "only (not) critical"),
            _q("limit", {"type": "integer", "minimum": 1, "maximum": 500}, ""),
            _q("offset", {"type": "integer", "minimum": 0}, ""),
        ],
        None,
        200,
        "application/json",
    ),
    ("GET", "/api/v1/studies/{study_uid}"): (
        "A study: series, instances, current results, findings, reviews (audited)",
        ("radiologist",),
        [_p("study_uid", _UID)],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/studies/{study_uid}/restore"): (
        "Bring an archived or cold study back to the hot tier",
        ("radiologist", "operator"),
        [_p("study_uid", _UID)],
        None,
        202,
        "application/json",
    ),
    ("POST", "/api/v1/studies/{study_uid}/rerun"): (
        "Run a study's inference again (every model that applies, or one); each new result "
        "supersedes the previous one; audited. 409 while the study is receiving or running",
        ("radiologist", "operator"),
        [_p("study_uid", _UID)],
        {
            "type": "object",
            "properties": {"model": {"type": "string", "maxLength": 64}},
        },
        202,
        "application/json",
    ),
    ("GET", "/api/v1/studies/{study_uid}/priors"): (
        "The patient's studies with their segmentation measurements, oldest first",
        ("radiologist",),
        [_p("study_uid", _UID)],
        None,
        200,
        "application/json",
    ),
    ("GET", "/api/v1/studies/{study_uid}/report.pdf"): (
        "The study's AI report as PDF (findings, measurements, model versions, reviews)",
        ("radiologist",),
        [_p("study_uid", _UID)],
        None,
        200,
        "application/pdf",
    ),
    ("GET", "/api/v1/series/{series_uid}/image"): (
        "One slice as PNG with a window preset and the AI overlay",
        ("radiologist",),
        [
            _p("series_uid", _UID),
            _q("index", {"type": "integer", "minimum": 0}, "slice in instance order"),
            _q("preset", {"enum": ["auto", "soft-tissue", "lung", "bone", "brain"]}, ""),
            _q("overlay", {"enum": ["0", "1"]}, "blend the segmentation"),
        ],
        None,
        200,
        "image/png",
    ),
    ("GET", "/api/v1/results/{result_id}/objects/{kind}"): (
        "The DICOM SR, SEG or Key Object Selection (KO) of a result",
        ("radiologist",),
        [_p("result_id", _RID), _p("kind", {"enum": ["SR", "SEG", "KO", "sr", "seg", "ko"]})],
        None,
        200,
        "application/dicom",
    ),
    ("POST", "/api/v1/results/{result_id}/reviews"): (
        "Accept, reject or comment on a finding (synced to the hub; needs X-CSRF-Token "
        "with a session)",
        ("radiologist",),
        [_p("result_id", _RID)],
        {
            "type": "object",
            "required": ["finding", "decision"],
            "properties": {
                "finding": {"type": "string", "maxLength": 64},
                "decision": {"enum": ["accept", "reject", "comment"]},
                "comment": {"type": "string", "maxLength": 2000},
            },
        },
        201,
        "application/json",
    ),
    ("GET", "/api/v1/conflicts"): (
        "This site's records edited on both sides, waiting for a person (from the hub)",
        ("radiologist", "operator"),
        [],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/conflicts/{conflict_id}/resolve"): (
        "Keep the edge or the cloud version of a conflicting record",
        ("radiologist", "operator"),
        [_p("conflict_id", {"type": "integer", "minimum": 1})],
        {
            "type": "object",
            "required": ["take"],
            "properties": {"take": {"enum": ["edge", "cloud"]}},
        },
        200,
        "application/json",
    ),
    ("GET", "/api/v1/status"): (
        "Node status: connectivity, outbox, storage, devices, models, recent errors",
        ("operator",),
        [],
        None,
        200,
        "application/json",
    ),
    ("GET", "/api/v1/users"): ("Local accounts", (), [], None, 200, "application/json"),
    ("POST", "/api/v1/users"): (
        "Create an account (its password must be changed at the first login)",
        (),
        [],
        {
            "type": "object",
            "required": ["username", "role", "password"],
            "properties": {
                "username": {"type": "string", "pattern": "^[a-z][a-z0-9._-]{1,63}$"},
                "role": {"enum": ["radiologist", "operator", "admin"]},
                "password": {"type": "string", "minLength": 12},
            },
        },
        201,
        "application/json",
    ),
    ("POST", "/api/v1/users/{username}/disable"): (
        "Disable an account: its sessions end, its API tokens stop working",
        (),
        [_p("username", _USERNAME)],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/users/{username}/enable"): (
        "Enable a disabled account",
        (),
        [_p("username", _USERNAME)],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/users/{username}/logout"): (
        "End every session of an account",
        (),
        [_p("username", _USERNAME)],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/users/{username}/password"): (
        "Set an account's password; it must be changed at the next login, its sessions end",
        (),
        [_p("username", _USERNAME)],
        {
            "type": "object",
            "required": ["password"],
            "properties": {"password": {"type": "string", "minLength": 12}},
        },
        200,
        "application/json",
    ),
    ("POST", "/api/v1/account/password"): (
        "Change your own password (a session, not an API token); your other sessions end",
        ("radiologist", "operator"),
        [],
        {
            "type": "object",
            "required": ["current", "new"],
            "properties": {
                "current": {"type": "string"},
                "new": {"type": "string", "minLength": 12},
            },
        },
        200,
        "application/json",
    ),
    ("GET", "/api/v1/tokens"): (
        "API tokens: name, user, created, expiry, revocation (never the secret)",
        (),
        [],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/tokens/{name}/revoke"): (
        "Revoke an API token; it stops working at once",
        (),
        [_p("name", {"type": "string", "maxLength": 64})],
        None,
        200,
        "application/json",
    ),
    ("POST", "/api/v1/tokens"): (
        "Create an API token acting as a user (shown once); it expires after ttl_days "
        "(default web.api_token_ttl_days)",
        (),
        [],
        {
            "type": "object",
            "required": ["name", "username"],
            "properties": {
                "name": {"type": "string"},
                "username": {"type": "string"},
                "ttl_days": {"type": "number", "exclusiveMinimum": 0, "maximum": 3650},
            },
        },
        201,
        "application/json",
    ),
    ("GET", "/api/v1/audit"): (
        "Export the audit log (who viewed or changed what, when, from where)",
        (),
        [
            _q("since", {"type": "number"}, "Unix time"),
            _q("format", {"enum": ["json", "csv"]}, ""),
            _q("limit", {"type": "integer", "minimum": 1}, ""),
        ],
        None,
        200,
        "application/json",
    ),
    ("GET", "/api/v1/openapi.json"): (
        "This document",
        ("radiologist", "operator"),
        [],
        None,
        200,
        "application/json",
    ),
    ("GET", "/metrics"): ("Prometheus metrics", ("operator",), [], None, 200, "text/plain"),
    ("GET", "/healthz"): (
        "The process is alive (no auth)",
        ("public",),
        [],
        None,
        200,
        "application/json",
    ),
    ("GET", "/readyz"): (
        "Store writable, listener accepting, models loaded (no auth; 503 otherwise)",
        ("public",),
        [],
        None,
        200,
        "application/json",
    ),
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), (summary, roles, params, body, status, ctype) in OPERATIONS.items():
        public = roles == ("public",)
        op: dict[str, Any] = {
            "summary": summary,
            "description": "Roles: "
            + ("none (public)" if public else ", ".join((*roles, "admin"))),
            "parameters": params,
            "responses": {
                str(status): {
                    "description": "success",
                    "content": {
                        ctype: {
                            "schema": {"type": "string"}
                            if ctype != "application/json"
                            else {"type": "object"}
                        }
                    },
                },
                "default": {
                    "description": "error",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            },
        }
        if public:
            op["security"] = []
        if body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body}},
            }
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Edge agent API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "session": {"type": "apiKey", "in": "cookie", "name": "edge_session"},
                "token": {"type": "http", "scheme": "bearer"},
            },
        },
        "security": [{"session": []}, {"token": []}],
    }
