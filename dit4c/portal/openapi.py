"""The OpenAPI 3.1 description of ``/api/v1/`` (served at ``/api/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from dit4c.common.life import STATES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "Malformed request"),
    "401": _json(_ref("Error"), "Not authenticated"),
    "403": _json(_ref("Error"), "Not allowed (or a missing X-CSRF-Token with a session cookie)"),
    "404": _json(_ref("Error"), "No such thing"),
}


def _op(summary: str, response: dict[str, Any], *, body: dict[str, Any] | None = None, status: str = "200", **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {status: response, **_ERRORS}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    op.update(extra)
    return op


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}, "description": "A login name"}


def _nodePaths() -> dict[str, Any]:
    """The compute nodes of the connected schedulers (docs/protocols.md 7.7), for administrators."""
    node = {
        "type": "object",
        "properties": {
            "node": {"type": "string", "description": "Its name, unique under its scheduler"},
            "connected": {"type": "boolean", "description": "Whether its scheduler's link to it is up"},
            "capacity": {"type": "integer"},
            "accepting": {"type": "boolean", "description": "false: cooling down (or not linked): it takes no new instances"},
            "active": {"type": "integer", "description": "Instances that count against its capacity"},
            "instances": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "How many it holds, by state"},
        },
    }
    scheduler = {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "name": {"type": "string"}, "disabled": {"type": "boolean"},
            "connected": {"type": "boolean", "description": "false: away; its nodes are not known until it connects"},
            "nodes": {"type": ["array", "null"], "items": node, "description": "null: away, or it has not said"},
        },
    }  # fmt: skip
    params = [
        {"name": "scheduler", "in": "path", "required": True, "schema": {"type": "string"}, "description": "A scheduler's id"},
        {"name": "node", "in": "path", "required": True, "schema": {"type": "string"}, "description": "The node's name"},
    ]
    done = _json(
        {"type": "object", "properties": {"stopping": {"type": "array", "items": {"type": "string"}, "description": "The instances a drain stopped"}}},
        "Done; 503 if the scheduler or the node cannot be asked now, or refused (the reason says why)",
    )
    what = {
        "cool-down": "Cool a node down: it takes no new instances; those on it run on",
        "accept": "Have a node that cools down take instances again",
        "drain": "Cool a node down, then stop each instance running or starting on it as its owner's Stop would"
        " (stopped, not discarded: its owner can resume or discard it)",
    }
    return {
        "/admin/nodes": {
            "get": _op(
                "Every registered scheduler and, for each connected one, its compute nodes (administrators)",
                _json({"type": "object", "properties": {"schedulers": {"type": "array", "items": scheduler}}}, "The nodes"),
            )
        },
        **{f"/admin/nodes/{{scheduler}}/{{node}}/{op}": {"post": _op(summary, done, parameters=params)} for op, summary in what.items()},
    }


def _filePaths() -> dict[str, Any]:
    """A person's storage on the file server (``dit4c.portal.files``; docs/protocols.md 13.6)."""
    path = {
        "name": "path", "in": "query", "required": False, "schema": {"type": "string"},
        "description": "A path in your storage, relative to its top (no leading /, no ..); empty: the top",
    }  # fmt: skip
    entry = {
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "path": {"type": "string"}, "type": {"enum": ["file", "folder", "other"]},
            "size": {"type": ["integer", "null"]}, "modified": {"type": ["integer", "null"], "description": "Seconds since the epoch"},
        },
    }  # fmt: skip
    listing = {"type": "object", "properties": {"path": {"type": "string"}, "entries": {"type": "array", "items": entry}}}
    failures = {
        "404": _json(_ref("Error"), "No such file or folder, or no storage on this portal (error 'no_storage')"),
        "409": _json(_ref("Error"), "Refused by the file server (a folder that is not empty)"),
        "502": _json(_ref("Error"), "The file server could not be reached"),
    }

    def op(summary: str, response: dict[str, Any], status: str = "200", **extra: Any) -> dict[str, Any]:
        done = _op(summary, response, status=status, parameters=[path], **extra)
        done["responses"].update(failures)
        return done

    bytesBody = {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    content = {"description": "The file's bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    return {
        "/files": {
            "get": op("A folder of your storage: its files and folders, folders first", _json(listing, "The listing")),
            "delete": op("Delete a file, or an empty folder", _json({"type": "object"}, "Deleted")),
        },
        "/files/content": {
            "get": op("A file of your storage, as bytes", content),
            "put": op(
                "Write a file (made or replaced); the body is its bytes, at most 32 MiB",
                _json({"type": "object"}, "Written: its path and size"), status="201", requestBody=bytesBody,
            ),
        },
        "/files/folders": {"post": op("Make a folder", _json({"type": "object"}, "Made: its path"), status="201")},
    }


def document(publicURL: str) -> dict[str, Any]:
    instance = _json(_ref("Instance"), "The instance")
    access = _json(_ref("Access"), "Who may use the instance")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "DIT4C portal API",
            "version": "1",
            "description": (
                "Authenticate with 'Authorization: Bearer <personal API token>' (make one on your account "
                "page, /account/, or with POST /tokens). Errors are JSON objects with 'error' and 'reason'."
            ),
        },
        "servers": [{"url": f"{publicURL}/api/v1"}],
        "security": [{"token": []}],
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "reason"],
                    "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
                },
                "User": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string"},
                        "display_name": {"type": ["string", "null"]},
                        "email": {"type": ["string", "null"]},
                        "is_admin": {"type": "boolean"},
                        "max_instances": {"type": ["integer", "null"]},
                        "disabled": {"type": "boolean"},
                    },
                },
                "Access": {
                    "type": "object",
                    "required": ["shared_with"],
                    "properties": {
                        "shared_with": {
                            "type": "array",
                            "description": "Who may use the instance besides its owner, oldest first: once for each "
                            "way in (named by the owner, or through a live share link)",
                            "items": {
                                "type": "object",
                                "required": ["name", "since", "link"],
                                "properties": {
                                    "name": {"type": "string", "description": "Their login name"},
                                    "since": {"type": "number"},
                                    "link": {
                                        "type": ["string", "null"],
                                        "description": "The share link they followed; null if named by the owner",
                                    },
                                },
                            },
                        }
                    },
                },
                "Image": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string"},
                        "ref": {"type": "string"},
                        "port": {"type": ["integer", "null"]},
                        "digest": {"type": ["string", "null"], "description": "sha256:<hex> of a saved image's archive"},
                        "mine": {"type": "boolean"},
                        "limits": _ref("Limits"),
                    },
                },
                "Limits": {
                    "type": "object",
                    "description": "What each instance of an image may use; null: no limit (docs/protocols.md 14.5)",
                    "properties": {
                        "cpus": {"type": ["number", "null"], "minimum": 0.01, "maximum": 1024},
                        "memory": {"type": ["integer", "null"], "description": "MiB", "minimum": 16},
                        "idle": {"type": ["integer", "null"], "description": "minutes without traffic before idle_action", "minimum": 1},
                        "idle_action": {"type": "string", "enum": ["stop", "save"]},
                    },
                },
                "Instance": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "description": "DNS-label-safe, time-sortable"},
                        "state": {
                            "type": "string",
                            "enum": [state.value for state in STATES],
                            "description": "The instance's life: GET /api/v1/life says which actions each state allows.",
                        },
                        "reason": {
                            "type": ["string", "null"],
                            "description": "Why it is in this state; for an errored instance, what went wrong "
                            "and the last lines of the tool's output.",
                        },
                        "url": {"type": ["string", "null"]},
                        "image": {"type": "string"},
                        "owner": {"type": "string"},
                        "scheduler": {"type": ["string", "null"]},
                        "created": {"type": "number"},
                        "updated": {"type": "number"},
                        "shared": {"type": "boolean"},
                    },
                },
            },
        },
        "paths": {
            "/me": {"get": _op("The caller", _json(_ref("User"), "The caller"))},
            "/life": {
                "get": _op(
                    "An instance's life: its states, which states each action is allowed in, and the deadline "
                    "(seconds) of each transient state, past which the instance becomes errored",
                    _json(
                        {
                            "type": "object",
                            "properties": {
                                "states": {"type": "array", "items": {"type": "string", "enum": [s.value for s in STATES]}},
                                "active": {"type": "array", "items": {"type": "string"}},
                                "transient": {"type": "object", "additionalProperties": {"type": "number"}},
                                "actions": {"type": "object", "additionalProperties": {"type": "array"}},
                                "serving": {"type": "string", "description": "The state in which the tool answers at its URL"},
                            },
                        },
                        "The life",
                    ),
                )
            },
            "/tokens": {
                "get": _op("The caller's API tokens", _json({"type": "array"}, "Tokens (never their secrets)")),
                "post": _op(
                    "Create an API token; its secret is in this answer only",
                    _json({"type": "object"}, "The new token"),
                    body={"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                    status="201",
                ),
            },
            "/tokens/{id}": {"delete": _op("Revoke a token", _json({"type": "object"}, "Revoked"), parameters=[_ID])},
            "/images": {
                "get": _op("Images the caller may start", _json({"type": "array", "items": _ref("Image")}, "Images")),
                "post": _op(
                    "A saved image's file, as downloaded, as a new saved image of yours. The body is the file"
                    " (application/x-tar), streamed to the image server as it arrives; its tool is the one the"
                    " archive names, or the catalogue entry 'tool' (id, ref or name). 400: not a whole saved image"
                    " (not_an_image), unknown_tool, missing_tool, wrong_tool, digest_mismatch; 413: over the"
                    " portal's upload limit; nothing is kept of a refused file",
                    _json(_ref("Image"), "The new image, as the listing gives it"),
                    status="201",
                    parameters=[
                        {"name": "name", "in": "query", "schema": {"type": "string", "maxLength": 200}},
                        {"name": "filename", "in": "query", "schema": {"type": "string"}, "description": "The file's name: the image's name without .oci.tar when 'name' is not given"},
                        {"name": "tool", "in": "query", "schema": {"type": "string"}, "description": "A catalogue entry; required for an OCI archive"},
                        {"name": "X-DIT4C-Digest", "in": "header", "schema": {"type": "string"}, "description": "sha256:<hex> the file must have"},
                    ],
                    requestBody={"required": True, "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                ),
            },
            "/instances": {
                "get": _op("The caller's instances and those shared with them", _json({"type": "array", "items": _ref("Instance")}, "Instances")),
                "post": _op(
                    "Start an instance (409 when over quota, 503 when no cluster is available)",
                    instance,
                    body={
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string"}, "scheduler": {"type": "string"}},
                    },
                    status="201",
                ),
            },
            "/instances/{id}": {"get": _op("One instance", instance, parameters=[_ID])},
            "/instances/{id}/stop": {"post": _op("Stop", instance, parameters=[_ID])},
            "/instances/{id}/save": {"post": _op("Save as an image of yours: a running instance is stopped first, a stopped one saved as it is", instance, parameters=[_ID])},
            "/instances/{id}/resume": {
                "post": _op(
                    "Start a stopped instance again on its node, its files as they were (409 over the quota; a "
                    "runtime that cannot resume leaves it stopped, with the reason)",
                    instance,
                    parameters=[_ID],
                )
            },
            "/instances/{id}/discard": {
                "post": _op("Discard a stopped, saved or errored instance: nothing of it is left", instance, parameters=[_ID])
            },
            "/instances/{id}/logs": {
                "get": _op(
                    "The tool's output: a piece as JSON (offset, next, text, error; no offset: the last "
                    "'limit' bytes, at most 131072), or with follow=1 plain text that grows as the tool "
                    "writes, until it stops. The owner's only",
                    {
                        "description": "A piece of the output, or (follow=1) the output as it comes",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "offset": {"type": "integer"},
                                        "next": {"type": "integer", "description": "The offset to ask from next"},
                                        "text": {"type": "string"},
                                        "error": {"type": ["string", "null"], "description": "Why there is no output now"},
                                    },
                                }
                            },
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    parameters=[
                        _ID,
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "follow", "in": "query", "schema": {"type": "boolean"}},
                    ],
                )
            },
            "/instances/{id}/shares": {
                "get": _op("Who may use this instance of yours, and how", access, parameters=[_ID]),
                "post": _op(
                    "Let another person use this instance",
                    access,
                    body={"type": "object", "required": ["user"], "properties": {"user": {"type": "string"}}},
                    parameters=[_ID],
                ),
            },
            "/instances/{id}/shares/{name}": {
                "delete": _op(
                    "Take this instance back from a person, however they came to use it (named, or through "
                    "share links, which stay for others); their open connections to it close",
                    access,
                    parameters=[_ID, _NAME],
                )
            },
            "/instances/{id}/links": {
                "get": _op("Share links of an instance", _json({"type": "array"}, "Links (never their tokens)"), parameters=[_ID]),
                "post": _op(
                    "Create a revocable share link; its URL is in this answer only",
                    _json({"type": "object"}, "The link and its URL"),
                    parameters=[_ID],
                    status="201",
                ),
            },
            "/instances/{id}/links/{link}": {
                "delete": _op(
                    "Revoke a share link (and every use it granted)",
                    _json({"type": "object"}, "Revoked"),
                    parameters=[_ID, {"name": "link", "in": "path", "required": True, "schema": {"type": "string"}}],
                )
            },
            "/images/{id}/download": {
                "get": _op(
                    "A saved image of yours, or shared with you, as a file (an OCI archive); its SHA-256 in the"
                    " Repr-Digest and X-DIT4C-Digest headers. 502 if the image server does not give it",
                    {"description": "The archive", "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}},
                    parameters=[_ID],
                )
            },
            "/images/{id}": {
                "delete": _op("Delete a saved image of yours", _json({"type": "object"}, "Deleted"), parameters=[_ID]),
                "patch": _op(
                    "Rename a saved image of yours (1 to 200 printable characters)",
                    _json(_ref("Image"), "The image"),
                    body={"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                    parameters=[_ID],
                ),
            },
            "/images/{id}/shares": {
                "post": _op(
                    "Share a saved image with a person",
                    _json({"type": "object"}, "Shared"),
                    body={"type": "object", "required": ["user"], "properties": {"user": {"type": "string"}}},
                    parameters=[_ID],
                )
            },
            "/images/{id}/shares/{name}": {
                "delete": _op("Stop sharing a saved image with a person", _json({"type": "object"}, "Unshared"), parameters=[_ID, _NAME])
            },
            "/admin/users": {
                "get": _op("Everyone (administrators)", _json({"type": "array", "items": _ref("User")}, "Users")),
                "post": _op(
                    "Add a person; their generated password is in this answer only",
                    _json(_ref("User"), "The new user, with 'password'"),
                    body={"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "is_admin": {"type": "boolean"}}},
                    status="201",
                ),
            },
            "/admin/users/{id}": {
                "patch": _op(
                    "Change a person: display_name, email, is_admin, max_instances (quota), disabled",
                    _json(_ref("User"), "The user"),
                    body={"type": "object"},
                    parameters=[_ID],
                ),
                "delete": _op(
                    "Remove a disabled person whose instances are all discarded: their instances' records, saved images,"
                    " sessions, tokens and shares go; their storage on the file server stays (409 until then)",
                    _json({"type": "object"}, "What went: removed (the id), instances and images (how many)"),
                    parameters=[_ID],
                ),
            },
            "/admin/users/{id}/end-instances": {
                "post": _op(
                    "A disabled person's instances one step towards their end: running ones stopped, those at rest"
                    " discarded (call again once the stopped ones are at rest)",
                    _json({"type": "object"}, "How many were stopped and how many discarded"),
                    parameters=[_ID],
                )
            },
            "/admin/schedulers/{id}/users": {
                "put": _op(
                    "Open a scheduler to these people only (an empty list: everyone)",
                    _json({"type": "object"}, "Who may use it"),
                    body={"type": "object", "required": ["users"], "properties": {"users": {"type": "array", "items": {"type": "string"}}}},
                    parameters=[_ID],
                )
            },
            "/admin/keys/rotate": {"post": _op("Make a new portal signing key current", _json({"type": "object"}, "Its key id"))},
            "/admin/images": {
                "post": _op(
                    "Add a catalogue image",
                    _json({"type": "object"}, "The image"),
                    body={"type": "object", "required": ["name", "ref"], "properties": {"name": {"type": "string"}, "ref": {"type": "string"}, "port": {"type": "integer"}, "limits": _ref("Limits")}},
                    status="201",
                )
            },
            "/admin/images/{id}/limits": {
                "put": _op(
                    "Set a catalogue entry's limits, for instances started from now on and images saved from them",
                    _json({"type": "object"}, "The image"),
                    body=_ref("Limits"),
                    parameters=[_ID],
                )
            },
            **_nodePaths(),
            **_filePaths(),
            "/admin/schedulers": {
                "post": _op(
                    "Register a scheduler by its public key (JWK)",
                    _json({"type": "object"}, "The scheduler"),
                    body={"type": "object", "required": ["name", "public_jwk"], "properties": {"name": {"type": "string"}, "public_jwk": {"type": "object"}}},
                    status="201",
                )
            },
        },
    }
