//! The OpenAPI 3 description of the API, served at `GET /api/v1/openapi.json`.
//!
//! Written by hand from `model.rs` and `handlers.rs`; a unit test checks that
//! it names exactly the routes of the router ([`super::ROUTES`]). Keep the
//! schemas in step with the structs when either changes.

use std::sync::OnceLock;

use serde_json::{json, Value};

/// The document (built once).
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build)
}

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// A JSON 200 response with a schema.
fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

/// An error response (the common error body).
fn err(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": r("Error") } } })
}

/// Responses every authenticated route can give, plus `extra`.
fn responses(success: Value, extra: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("200".into(), success);
    for (code, d) in extra {
        m.insert((*code).into(), err(d));
    }
    m.insert(
        "401".into(),
        err("A token is configured and the request has no valid `Authorization: Bearer <token>`."),
    );
    m.insert(
        "500".into(),
        err("Internal error (I/O, a failed image check, a bug); the daemon log has details."),
    );
    m.insert("503".into(), err("The daemon is shutting down."));
    Value::Object(m)
}

fn body(schema: &str, example: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": r(schema), "example": example } } })
}

fn query(name: &str, required: bool, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": required, "description": description, "schema": schema })
}

fn path_param(name: &str, description: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "description": description, "schema": { "type": "string" } })
}

const BAD_BODY: &str = "The body is not JSON, lacks a required field or has a wrong type.";
const BAD_TYPE: &str = "The body is not sent as `Content-Type: application/json`.";
const TOO_LARGE: &str = "The body is larger than 1 MiB.";

fn build() -> Value {
    let change_id_example = "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5490";
    let nullable_string = json!({ "type": ["string", "null"] });
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "chainvault control API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Start VM backups (one NBD target per disk), complete each disk with its change_id, look up the change_id for the next incremental, inspect chains and open restores. Every error is JSON: {\"error\": \"...\", \"details\": ...}. When the daemon has a token, every path but /healthz needs `Authorization: Bearer <token>`."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "details"],
                    "properties": {
                        "error": { "type": "string", "description": "What was wrong and how to fix it." },
                        "details": { "description": "Structured details (the field or parameter at fault, the object not found, the allowed methods), or null." }
                    }
                },
                "BackupType": { "type": "string", "enum": ["full", "incremental"] },
                "Status": { "type": "string", "enum": ["running", "completed", "failed", "interrupted"] },
                "DiskSpec": {
                    "type": "object",
                    "required": ["disk_id"],
                    "properties": {
                        "disk_id": { "type": "integer", "minimum": 0, "description": "Disk index: 0, 1, 2, ..." },
                        "disk_key": { "type": ["string", "null"], "description": "The hypervisor's key, e.g. VMware \"disk-2000\"." },
                        "capacity_bytes": { "type": ["integer", "null"], "minimum": 0, "description": "Virtual size; required for a disk chainvault has not seen." },
                        "mode": { "oneOf": [r("BackupType"), { "type": "null" }], "description": "Per-disk override: \"full\" after a CBT reset of this disk alone." },
                        "compare_with_parent": { "type": "boolean", "default": false, "description": "With a full of a disk that has a previous point: store the new point as an overlay of it holding only clusters that differ." }
                    }
                },
                "StartRequest": {
                    "type": "object",
                    "required": ["vm_name", "backup_type"],
                    "properties": {
                        "vm_name": { "type": "string" },
                        "backup_type": r("BackupType"),
                        "repository_id": { "type": ["string", "null"] },
                        "tags": { "type": "array", "items": { "type": "string" }, "default": [] },
                        "disks": { "type": ["array", "null"], "items": r("DiskSpec"), "description": "Required the first time a VM is seen; a known VM may omit it." }
                    }
                },
                "DiskTarget": {
                    "type": "object",
                    "required": ["disk_id", "disk_key", "capacity_bytes", "mode", "export_name", "nbd_uri", "previous_change_id", "parent_backup_id", "compare_with_parent"],
                    "properties": {
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "disk_key": nullable_string,
                        "capacity_bytes": { "type": "integer", "minimum": 0 },
                        "mode": r("BackupType"),
                        "reason": { "type": "string", "description": "Why mode differs from what was asked (present only then)." },
                        "export_name": { "type": "string" },
                        "nbd_uri": { "type": "string", "description": "Complete NBD URI for nbdcopy, nbdinfo, qemu-img." },
                        "previous_change_id": { "type": "string", "description": "Read changed blocks since this change_id; \"\" for a full." },
                        "parent_backup_id": nullable_string,
                        "compare_with_parent": { "type": "boolean" }
                    }
                },
                "StartResponse": {
                    "type": "object",
                    "required": ["backup_id", "vm_name", "backup_type", "status", "created_at", "disks"],
                    "properties": {
                        "backup_id": { "type": "string" },
                        "vm_name": { "type": "string" },
                        "backup_type": r("BackupType"),
                        "status": r("Status"),
                        "created_at": { "type": "string", "format": "date-time" },
                        "disks": { "type": "array", "items": r("DiskTarget") }
                    }
                },
                "CompleteRequest": {
                    "type": "object",
                    "required": ["change_id", "disk_id"],
                    "properties": {
                        "change_id": { "type": "string", "minLength": 1, "description": "The hypervisor's change_id for this disk's snapshot; stored as an opaque string." },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "bytes_transferred": { "type": ["integer", "null"], "minimum": 0 }
                    }
                },
                "CompleteResponse": {
                    "type": "object",
                    "required": ["status", "backup_id", "disk_id", "change_id", "message", "timestamp", "backup_status"],
                    "properties": {
                        "status": { "type": "string", "example": "completed" },
                        "backup_id": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "change_id": { "type": "string" },
                        "message": { "type": "string" },
                        "timestamp": { "type": "string", "format": "date-time" },
                        "backup_status": { "allOf": [r("Status")], "description": "Status of the whole backup after this completion." }
                    }
                },
                "FailRequest": {
                    "type": "object",
                    "properties": { "reason": { "type": ["string", "null"] } }
                },
                "ChangeIdResponse": {
                    "type": "object",
                    "required": ["vm_name", "disk_id", "change_id", "backup_id", "message"],
                    "properties": {
                        "vm_name": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "change_id": { "type": "string", "description": "\"\" when there is no previous backup of this disk." },
                        "backup_id": { "type": "string", "description": "The backup that recorded change_id (\"\" when none)." },
                        "message": { "type": "string" }
                    }
                },
                "DiskBackupRecord": {
                    "type": "object",
                    "required": ["backup_id", "disk_id", "vm_name", "disk_key", "capacity_bytes", "mode", "reason", "parent_backup_id", "chain_id", "image", "status", "change_id", "bytes_transferred", "size_on_disk", "started_at", "completed_at", "error"],
                    "properties": {
                        "backup_id": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "vm_name": { "type": "string" },
                        "disk_key": nullable_string,
                        "capacity_bytes": { "type": "integer", "minimum": 0 },
                        "mode": r("BackupType"),
                        "reason": nullable_string,
                        "parent_backup_id": { "type": ["string", "null"], "description": "The point this one is an overlay of." },
                        "chain_id": { "type": "string", "description": "A full (or a CBT reset) starts a new chain." },
                        "image": { "type": "string", "description": "Image path relative to the repository root." },
                        "status": r("Status"),
                        "change_id": nullable_string,
                        "bytes_transferred": { "type": ["integer", "null"] },
                        "size_on_disk": { "type": ["integer", "null"] },
                        "started_at": { "type": "string", "format": "date-time" },
                        "completed_at": { "type": ["string", "null"], "format": "date-time" },
                        "error": nullable_string
                    }
                },
                "BackupView": {
                    "type": "object",
                    "required": ["backup_id", "vm_name", "backup_type", "status", "repository_id", "tags", "disk_ids", "created_at", "finished_at", "error", "disks"],
                    "properties": {
                        "backup_id": { "type": "string" },
                        "vm_name": { "type": "string" },
                        "backup_type": r("BackupType"),
                        "status": r("Status"),
                        "repository_id": nullable_string,
                        "tags": { "type": "array", "items": { "type": "string" } },
                        "disk_ids": { "type": "array", "items": { "type": "integer", "minimum": 0 } },
                        "created_at": { "type": "string", "format": "date-time" },
                        "finished_at": { "type": ["string", "null"], "format": "date-time" },
                        "error": nullable_string,
                        "protected": { "type": "boolean", "description": "Prune and delete refuse a protected backup." },
                        "note": nullable_string,
                        "disks": { "type": "array", "items": r("DiskBackupRecord") }
                    }
                },
                "AnnotateRequest": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "protected": { "type": "boolean" },
                        "note": { "type": ["string", "null"], "maxLength": 4096 }
                    }
                },
                "BackupList": {
                    "type": "object",
                    "required": ["count", "backups"],
                    "properties": {
                        "count": { "type": "integer", "minimum": 0 },
                        "backups": { "type": "array", "items": r("BackupView") }
                    }
                },
                "ChainHead": {
                    "type": "object",
                    "required": ["vm_name", "disk_id", "chain_id", "head_backup_id", "head_change_id"],
                    "properties": {
                        "vm_name": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "chain_id": { "type": "string" },
                        "head_backup_id": { "type": "string" },
                        "head_change_id": { "type": "string" }
                    }
                },
                "ChainView": {
                    "type": "object",
                    "required": ["vm_name", "disk_id", "head", "points"],
                    "properties": {
                        "vm_name": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "head": { "oneOf": [r("ChainHead"), { "type": "null" }] },
                        "points": { "type": "array", "items": r("DiskBackupRecord"), "description": "Oldest first." }
                    }
                },
                "DeletedResponse": {
                    "type": "object",
                    "required": ["status", "message", "timestamp"],
                    "properties": {
                        "status": { "type": "string", "enum": ["deleted", "closed"] },
                        "backup_id": { "type": "string" },
                        "restore_id": { "type": "string" },
                        "message": { "type": "string" },
                        "timestamp": { "type": "string", "format": "date-time" }
                    }
                },
                "RestoreRequest": {
                    "type": "object",
                    "required": ["backup_id", "disk_id"],
                    "properties": {
                        "backup_id": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 }
                    }
                },
                "RestoreView": {
                    "type": "object",
                    "required": ["restore_id", "backup_id", "disk_id", "export_name", "nbd_uri", "size", "created_at"],
                    "properties": {
                        "restore_id": { "type": "string" },
                        "backup_id": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "export_name": { "type": "string" },
                        "nbd_uri": { "type": "string", "description": "Read-only NBD export of the point in time (the whole chain below it)." },
                        "size": { "type": "integer", "minimum": 0 },
                        "created_at": { "type": "string", "format": "date-time" }
                    }
                },
                "VerifyReport": {
                    "type": "object",
                    "required": ["points_checked", "problems"],
                    "properties": {
                        "points_checked": { "type": "integer", "minimum": 0 },
                        "problems": { "type": "array", "items": { "type": "string" }, "description": "Empty when everything checked is consistent." }
                    }
                },
                "Health": {
                    "type": "object",
                    "required": ["status"],
                    "properties": { "status": { "type": "string", "enum": ["ok"] } }
                }
            }
        },
        "security": [ { "bearer": [] } ],
        "paths": {
            "/api/v1/backups": {
                "post": {
                    "operationId": "startBackup",
                    "summary": "Start a VM-level backup: one new image and one NBD target per disk.",
                    "requestBody": body("StartRequest", json!({
                        "vm_name": "pgtest1", "backup_type": "incremental", "repository_id": "repo-1", "tags": ["nightly"],
                        "disks": [{ "disk_id": 0, "disk_key": "disk-2000", "capacity_bytes": 107374182400u64 }]
                    })),
                    "responses": responses(ok("The backup started; each disk lists its NBD target and previous change_id.", r("StartResponse")), &[
                        ("400", "Missing or invalid fields (e.g. no disks for a VM seen the first time)."),
                        ("409", "A backup of this VM is already running."),
                        ("413", TOO_LARGE),
                        ("415", BAD_TYPE)
                    ])
                },
                "get": {
                    "operationId": "listBackups",
                    "summary": "List backups, optionally of one VM and/or in one status.",
                    "parameters": [
                        query("vm_name", false, "Only this VM's backups.", json!({ "type": "string" })),
                        query("status", false, "Only backups in this status.", r("Status"))
                    ],
                    "responses": responses(ok("The backups.", r("BackupList")), &[
                        ("400", "status is not one of running, completed, failed, interrupted.")
                    ])
                }
            },
            "/api/v1/backups/changeid": {
                "get": {
                    "operationId": "previousChangeId",
                    "summary": "The change_id recorded by the last completed backup of one disk (\"\" when there is none).",
                    "parameters": [
                        query("vm_name", true, "The VM.", json!({ "type": "string" })),
                        query("disk_id", true, "Disk index.", json!({ "type": "integer", "minimum": 0 }))
                    ],
                    "responses": responses(ok("The change_id (200 with \"\" when there is no previous backup).", r("ChangeIdResponse")), &[
                        ("400", "vm_name or disk_id missing, or disk_id not a disk index.")
                    ])
                }
            },
            "/api/v1/backups/chain": {
                "get": {
                    "operationId": "chain",
                    "summary": "Every point in time of one disk, oldest first, with the current chain head.",
                    "parameters": [
                        query("vm_name", true, "The VM.", json!({ "type": "string" })),
                        query("disk_id", true, "Disk index.", json!({ "type": "integer", "minimum": 0 }))
                    ],
                    "responses": responses(ok("The chain.", r("ChainView")), &[
                        ("400", "vm_name or disk_id missing, or disk_id not a disk index."),
                        ("404", "Unknown VM or disk.")
                    ])
                }
            },
            "/api/v1/backups/{backup_id}": {
                "parameters": [ path_param("backup_id", "The backup id returned by the start request.") ],
                "get": {
                    "operationId": "getBackup",
                    "summary": "One backup with all its disks.",
                    "responses": responses(ok("The backup.", r("BackupView")), &[
                        ("404", "No backup with this id.")
                    ])
                },
                "patch": {
                    "operationId": "annotateBackup",
                    "summary": "Protect or unprotect a backup, and set or clear its note. Fields left out stay as they are.",
                    "requestBody": body("AnnotateRequest", json!({ "protected": true, "note": "before the ERP upgrade" })),
                    "responses": responses(ok("The backup as it is now.", r("BackupView")), &[
                        ("400", "No field given, an unknown field, a note longer than 4096 bytes or holding control characters."),
                        ("404", "No backup with this id."),
                        ("413", TOO_LARGE),
                        ("415", BAD_TYPE)
                    ])
                },
                "delete": {
                    "operationId": "deleteBackup",
                    "summary": "Delete a backup, anywhere in its chains: what later points still read through it is merged into the chain first (crash-safe, journalled).",
                    "responses": responses(ok("Deleted.", r("DeletedResponse")), &[
                        ("404", "No backup with this id."),
                        ("409", "The backup cannot be deleted now (it is protected, running, the parent of a running backup, being consolidated, or a restore has it open); the message says which.")
                    ])
                }
            },
            "/api/v1/backups/{backup_id}/complete": {
                "parameters": [ path_param("backup_id", "The backup id returned by the start request.") ],
                "post": {
                    "operationId": "completeDisk",
                    "summary": "Complete one disk of a backup: flush, check, and record its change_id. Each disk completes on its own.",
                    "requestBody": body("CompleteRequest", json!({
                        "change_id": change_id_example, "disk_id": 0, "bytes_transferred": 5368709120u64
                    })),
                    "responses": responses(ok("The disk is completed and its change_id recorded.", r("CompleteResponse")), &[
                        ("400", "change_id missing or empty, disk_id missing, or another malformed field."),
                        ("404", "No backup with this id, or the backup has no such disk."),
                        ("409", "The disk is already completed, or the backup failed or was interrupted."),
                        ("413", TOO_LARGE),
                        ("415", BAD_TYPE)
                    ])
                }
            },
            "/api/v1/backups/{backup_id}/fail": {
                "parameters": [ path_param("backup_id", "The backup id returned by the start request.") ],
                "post": {
                    "operationId": "failBackup",
                    "summary": "Give up on a running backup; its unfinished images are removed. The body may be left out.",
                    "requestBody": {
                        "required": false,
                        "content": { "application/json": { "schema": r("FailRequest"), "example": { "reason": "snapshot removed during transfer" } } }
                    },
                    "responses": responses(ok("The backup, now failed.", r("BackupView")), &[
                        ("400", BAD_BODY),
                        ("404", "No backup with this id."),
                        ("409", "The backup has already finished."),
                        ("413", TOO_LARGE),
                        ("415", BAD_TYPE)
                    ])
                }
            },
            "/api/v1/restores": {
                "post": {
                    "operationId": "openRestore",
                    "summary": "Export one disk at one point in time, read-only, over NBD.",
                    "requestBody": body("RestoreRequest", json!({ "backup_id": "0193f0a2-5c1e-7d3a-9f00-1b2c3d4e5f60", "disk_id": 0 })),
                    "responses": responses(ok("The export is open.", r("RestoreView")), &[
                        ("400", BAD_BODY),
                        ("404", "No such backup, or it has no such disk."),
                        ("409", "That disk of the backup is not completed."),
                        ("413", TOO_LARGE),
                        ("415", BAD_TYPE)
                    ])
                }
            },
            "/api/v1/restores/{restore_id}": {
                "parameters": [ path_param("restore_id", "The restore id returned when it was opened.") ],
                "delete": {
                    "operationId": "closeRestore",
                    "summary": "Close a restore export.",
                    "responses": responses(ok("Closed.", r("DeletedResponse")), &[
                        ("404", "No open restore with this id.")
                    ])
                }
            },
            "/api/v1/verify": {
                "get": {
                    "operationId": "verify",
                    "summary": "Check the catalog against the images (chain links, files, image consistency). 200 whether or not problems were found.",
                    "parameters": [ query("vm_name", false, "Only this VM.", json!({ "type": "string" })) ],
                    "responses": responses(ok("What was checked and the problems found.", r("VerifyReport")), &[
                        ("404", "Unknown VM.")
                    ])
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": responses(ok("OpenAPI 3 document.", json!({ "type": "object" })), &[])
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness. Never needs a token.",
                    "security": [],
                    "responses": { "200": ok("The daemon is up.", r("Health")) }
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus text exposition: chainvault_backups{status}, chainvault_bytes_received_total, chainvault_active_exports, chainvault_active_restores.",
                    "responses": responses(json!({
                        "description": "Metrics in the Prometheus text format 0.0.4.",
                        "content": { "text/plain": { "schema": { "type": "string" } } }
                    }), &[])
                }
            }
        }
    })
}
