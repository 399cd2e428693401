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
        "403".into(),
        err("The token's role may not call this route, or it is limited to VMs and the route acts on the whole repository (docs/api.md, \"Tokens and roles\")."),
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
    let mut doc = build_core();
    let (schemas, paths) = lifecycle();
    for (k, v) in schemas.as_object().into_iter().flatten() {
        doc["components"]["schemas"][k] = v.clone();
    }
    for (k, v) in paths.as_object().into_iter().flatten() {
        doc["paths"][k] = v.clone();
    }
    doc["components"]["schemas"]["RestoreList"] = json!({
        "type": "object", "required": ["restores"],
        "properties": { "restores": { "type": "array", "items": r("RestoreView") } }
    });
    doc["paths"]["/api/v1/restores"]["get"] = json!({
        "operationId": "listRestores",
        "summary": "Every open restore; instant (writable) ones with the size of their overlay. Instant restores survive a daemon restart.",
        "responses": responses(ok("The open restores.", r("RestoreList")), &[])
    });
    doc["paths"]["/api/v1/restores/{restore_id}"]["delete"]["parameters"] = json!([
        query("keep_as", false, "Instant restores: first write the point with the overlay's writes merged in as a standalone qcow2 image at this absolute path (a new file outside the repository).", json!({ "type": "string" }))
    ]);
    doc["paths"]["/api/v1/restores/{restore_id}"]["delete"]["responses"]["400"] =
        err("keep_as on a read-only restore, or a keep_as path that is relative, exists, is in a missing directory or inside the repository.");
    doc
}

/// Schemas and paths of retention policies and prune.
fn lifecycle() -> (Value, Value) {
    let count =
        |d: &str| json!({ "type": "integer", "minimum": 0, "maximum": 100000, "description": d });
    let keep_props = json!({
        "keep_last": count("Keep the N newest backups."),
        "keep_hourly": count("Keep the newest backup of each of the N newest hours that have one."),
        "keep_daily": count("... of each of the N newest days."),
        "keep_weekly": count("... of each of the N newest ISO weeks."),
        "keep_monthly": count("... of each of the N newest months."),
        "keep_yearly": count("... of each of the N newest years.")
    });
    let mut policy_props = keep_props.clone();
    for (k, v) in [
        (
            "time_zone",
            json!({ "type": ["string", "null"], "description": "IANA name (Europe/Berlin), UTC, or an offset (+02:00). Periods are UTC when absent." }),
        ),
        ("prune", r("PruneWhen")),
        (
            "schedule",
            json!({ "type": ["string", "null"], "description": "With prune \"schedule\": \"HH:MM\" (daily, in the time zone) or \"every 6h\"." }),
        ),
        (
            "max_chain_length",
            json!({ "type": ["integer", "null"], "minimum": 2, "maximum": 100000 }),
        ),
    ] {
        policy_props[k] = v;
    }
    let mut stored = policy_props.clone();
    stored["updated_at"] = json!({ "type": "string", "format": "date-time" });
    let mut prune_props = keep_props.clone();
    prune_props["vm_name"] =
        json!({ "type": "string", "description": "Only this VM (default: every VM)." });
    prune_props["dry_run"] =
        json!({ "type": "boolean", "description": "Decide and report, remove nothing." });
    let schemas = json!({
        "PruneWhen": { "type": "string", "enum": ["after-backup", "schedule", "never"] },
        "RetentionPolicy": { "type": "object", "properties": stored },
        "PolicyRequest": { "type": "object", "additionalProperties": false, "properties": policy_props,
            "description": "Replaces the whole policy: every keep option left out is off." },
        "PolicyView": {
            "type": "object",
            "required": ["vm_name", "source", "policy"],
            "properties": {
                "vm_name": { "type": ["string", "null"] },
                "source": { "type": "string", "enum": ["vm", "default", "none"] },
                "policy": { "oneOf": [ r("RetentionPolicy"), { "type": "null" } ] }
            }
        },
        "PolicyList": { "type": "object", "required": ["policies"], "properties": { "policies": { "type": "array", "items": r("PolicyView") } } },
        "PruneRequest": { "type": "object", "additionalProperties": false, "properties": prune_props,
            "description": "Keep options given here replace the stored policy's for this run." },
        "PruneEntry": {
            "type": "object",
            "required": ["backup_id", "created_at", "status", "verdict", "reason", "bytes_freed"],
            "properties": {
                "backup_id": { "type": "string" },
                "created_at": { "type": "string", "format": "date-time" },
                "status": r("Status"),
                "verdict": { "type": "string", "enum": ["keep", "keep-partial", "protected", "running", "remove"] },
                "reason": { "type": "string", "description": "The option that keeps it (keep-daily, ...), or why it is kept or removed." },
                "bytes_freed": { "type": "integer", "minimum": 0, "description": "Estimated bytes its removal frees." },
                "error": { "type": "string", "description": "The removal was tried and failed." }
            }
        },
        "VmPrune": {
            "type": "object",
            "required": ["vm_name", "policy_source", "keep", "time_zone", "backups", "kept", "removed", "bytes_freed"],
            "properties": {
                "vm_name": { "type": "string" },
                "policy_source": { "type": "string", "enum": ["request", "vm", "default", "none"] },
                "keep": { "type": "object", "properties": keep_props },
                "time_zone": { "type": "string" },
                "backups": { "type": "array", "items": r("PruneEntry"), "description": "Newest first." },
                "kept": { "type": "integer" },
                "removed": { "type": "integer" },
                "bytes_freed": { "type": "integer", "description": "Dry run: the estimate; otherwise what the VM's images shrank by." }
            }
        },
        "ImportImage": {
            "type": "object", "additionalProperties": false, "required": ["path"],
            "properties": {
                "path": { "type": "string", "description": "Absolute path on the daemon's machine." },
                "created_at": { "type": "string", "format": "date-time", "description": "Default: the file's mtime." }
            }
        },
        "ImportRequest": {
            "type": "object", "additionalProperties": false, "required": ["vm_name", "disk_id", "images"],
            "properties": {
                "vm_name": { "type": "string" },
                "disk_id": { "type": "integer", "minimum": 0 },
                "images": { "type": "array", "items": r("ImportImage"), "minItems": 1, "maxItems": 10000, "description": "Oldest first." },
                "change_id": { "type": "string", "description": "The change_id of the last image." },
                "move": { "type": "boolean", "description": "Remove each source once its point is in the catalog." }
            }
        },
        "ImportReport": {
            "type": "object", "required": ["vm_name", "disk_id", "points", "bytes_copied", "moved"],
            "properties": {
                "vm_name": { "type": "string" },
                "disk_id": { "type": "integer" },
                "points": { "type": "array", "items": r("DiskBackupRecord") },
                "bytes_copied": { "type": "integer" },
                "moved": { "type": "boolean" }
            }
        },
        "Orphan": {
            "type": "object", "required": ["path", "bytes", "reason"],
            "properties": { "path": { "type": "string" }, "bytes": { "type": "integer" }, "reason": { "type": "string" } }
        },
        "GcRequest": { "type": "object", "additionalProperties": false, "properties": { "dry_run": { "type": "boolean" } } },
        "GcReport": {
            "type": "object", "required": ["dry_run", "orphans", "bytes", "removed", "directories_removed"],
            "properties": {
                "dry_run": { "type": "boolean" },
                "orphans": { "type": "array", "items": r("Orphan") },
                "bytes": { "type": "integer" },
                "removed": { "type": "integer" },
                "directories_removed": { "type": "integer" }
            }
        },
        "PointUsage": {
            "type": "object", "required": ["backup_id", "created_at", "bytes", "frees", "protected"],
            "properties": {
                "backup_id": { "type": "string" }, "created_at": { "type": "string" },
                "bytes": { "type": "integer", "description": "Bytes its image occupies." },
                "frees": { "type": "integer", "description": "Bytes removing it alone would free (estimate)." },
                "protected": { "type": "boolean" }
            }
        },
        "DiskUsage": { "type": "object", "required": ["disk_id", "bytes", "points"],
            "properties": { "disk_id": { "type": "integer" }, "bytes": { "type": "integer" }, "points": { "type": "array", "items": r("PointUsage") } } },
        "VmUsage": { "type": "object", "required": ["vm_name", "bytes", "points", "disks"],
            "properties": { "vm_name": { "type": "string" }, "bytes": { "type": "integer" }, "points": { "type": "integer" }, "disks": { "type": "array", "items": r("DiskUsage") } } },
        "UsageReport": {
            "type": "object", "required": ["vms", "bytes", "repository_bytes", "free_bytes", "filesystem_bytes"],
            "properties": {
                "vms": { "type": "array", "items": r("VmUsage") },
                "bytes": { "type": "integer" },
                "repository_bytes": { "type": "integer" },
                "free_bytes": { "type": "integer" },
                "filesystem_bytes": { "type": "integer" }
            }
        },
        "PruneReport": {
            "type": "object",
            "required": ["dry_run", "vms", "kept", "removed", "bytes_freed", "errors"],
            "properties": {
                "dry_run": { "type": "boolean" },
                "vms": { "type": "array", "items": r("VmPrune") },
                "kept": { "type": "integer" },
                "removed": { "type": "integer" },
                "bytes_freed": { "type": "integer" },
                "errors": { "type": "array", "items": { "type": "string" } }
            }
        }
    });
    let policy_example = json!({ "keep_last": 3, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6, "keep_yearly": 1, "time_zone": "Europe/Berlin" });
    let put = |op: &str, what: &str| {
        json!({
            "operationId": op,
            "summary": format!("Set {what}. The body replaces the whole policy."),
            "requestBody": body("PolicyRequest", policy_example.clone()),
            "responses": responses(ok("The policy as stored.", r("PolicyView")), &[
                ("400", "A negative or absurd count (over 100000), an unknown time zone or field, a schedule that cannot be read, or a chain length under 2."),
                ("413", TOO_LARGE),
                ("415", BAD_TYPE)
            ])
        })
    };
    let paths = json!({
        "/api/v1/policies": {
            "get": {
                "operationId": "listPolicies",
                "summary": "The server-wide default policy and every VM's own.",
                "responses": responses(ok("The policies.", r("PolicyList")), &[])
            }
        },
        "/api/v1/policies/default": {
            "get": {
                "operationId": "getDefaultPolicy",
                "summary": "The server-wide default policy (for VMs without their own).",
                "responses": responses(ok("The default, or source \"none\".", r("PolicyView")), &[])
            },
            "put": put("putDefaultPolicy", "the server-wide default policy"),
            "delete": {
                "operationId": "deleteDefaultPolicy",
                "summary": "Remove the default policy.",
                "responses": responses(ok("What applies now.", r("PolicyView")), &[("404", "There is no default policy.")])
            }
        },
        "/api/v1/policies/vms/{vm_name}": {
            "parameters": [ path_param("vm_name", "The VM's name.") ],
            "get": {
                "operationId": "getVmPolicy",
                "summary": "The policy that applies to the VM: its own (source \"vm\"), else the default.",
                "responses": responses(ok("The policy and its source.", r("PolicyView")), &[])
            },
            "put": put("putVmPolicy", "the VM's own policy"),
            "delete": {
                "operationId": "deleteVmPolicy",
                "summary": "Remove the VM's own policy: the default applies again.",
                "responses": responses(ok("What applies now.", r("PolicyView")), &[("404", "The VM has no policy of its own.")])
            }
        },
        "/api/v1/prune": {
            "post": {
                "operationId": "prune",
                "summary": "Apply retention to one VM or to all: every backup with its verdict and reason, and the bytes removing the rest frees. With dry_run nothing is removed. The body may be left out.",
                "requestBody": {
                    "required": false,
                    "content": { "application/json": { "schema": r("PruneRequest"), "example": { "vm_name": "web01", "keep_last": 3, "keep_daily": 7, "dry_run": true } } }
                },
                "responses": responses(ok("What was (or would be) kept and removed.", r("PruneReport")), &[
                    ("400", "A negative or absurd count, or an unknown field."),
                    ("404", "Unknown VM."),
                    ("413", TOO_LARGE),
                    ("415", BAD_TYPE)
                ])
            }
        },
        "/api/v1/imports": {
            "post": {
                "operationId": "import",
                "summary": "Adopt existing qcow2 files as the next points of one disk, oldest first. Every image is checked (check, virtual size, backing link, times) before any is adopted; then they are copied into the repository with their backing names rewritten, and recorded in one transaction.",
                "requestBody": body("ImportRequest", json!({ "vm_name": "web01", "disk_id": 0, "images": [ { "path": "/old/web01-full.qcow2", "created_at": "2026-01-01T02:00:00Z" }, { "path": "/old/web01-inc1.qcow2", "created_at": "2026-01-02T02:00:00Z" } ], "change_id": "52 66 8c 2d a7 c5 c5 68-c5 d2 8d 04 79 f5 fd 7d/5490" })),
                "responses": responses(ok("The new points.", r("ImportReport")), &[
                    ("400", "An image that is missing, not qcow2, corrupt, of another virtual size, with a backing file that is not the image before it (or for the first, not the disk's newest point), a time that is not later than the point before it or is in the future; nothing was adopted."),
                    ("409", "A backup of the VM is running, or a backup or another import of the VM ended while the images were copied (nothing adopted)."),
                    ("413", TOO_LARGE),
                    ("415", BAD_TYPE)
                ])
            }
        },
        "/api/v1/gc": {
            "post": {
                "operationId": "gc",
                "summary": "Find the files no catalog record or journal accounts for (leftovers of crashes) and, unless dry_run, remove them. The body may be left out.",
                "requestBody": { "required": false, "content": { "application/json": { "schema": r("GcRequest"), "example": { "dry_run": true } } } },
                "responses": responses(ok("The orphans found (and removed).", r("GcReport")), &[
                    ("400", BAD_BODY),
                    ("409", "A removal is consolidating a chain, or an import is copying; try again when it ends."),
                    ("413", TOO_LARGE),
                    ("415", BAD_TYPE)
                ])
            }
        },
        "/api/v1/usage": {
            "get": {
                "operationId": "usage",
                "summary": "Bytes each VM, disk and point occupies, what removing each point would free, the repository total and the free space.",
                "parameters": [ query("vm_name", false, "Only this VM.", json!({ "type": "string" })) ],
                "responses": responses(ok("Usage.", r("UsageReport")), &[("404", "Unknown VM.")])
            }
        }
    });
    (schemas, paths)
}

fn build_core() -> Value {
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
                        "bytes_transferred": { "type": ["integer", "null"], "minimum": 0 },
                        "digest": { "type": ["string", "null"], "pattern": "^cvblk2-blake3:[0-9a-f]{64}$", "description": "The client's digest of what it read from the source (docs/layout.md, \"Block digests\"). When given, the disk fails unless the stored point has the same digest." }
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
                        "digest": { "type": ["string", "null"], "description": "The point's digest, cvblk2-blake3:<hex>." },
                        "message": { "type": "string" },
                        "timestamp": { "type": "string", "format": "date-time" },
                        "backup_status": { "allOf": [r("Status")], "description": "Status of the whole backup after this completion." }
                    }
                },
                "DeepVerifyRequest": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "vm_name": { "type": ["string", "null"], "description": "Only this VM's points." },
                        "rate_mib_s": { "type": ["integer", "null"], "minimum": 0, "description": "Read at most this many MiB/s (0 or absent: no limit)." }
                    }
                },
                "DeepVerifyReport": {
                    "type": "object",
                    "properties": {
                        "points_checked": { "type": "integer" },
                        "points_bad": { "type": "integer" },
                        "points_without_digests": { "type": "integer" },
                        "blocks_checked": { "type": "integer" },
                        "bytes_read": { "type": "integer" },
                        "seconds": { "type": "number" },
                        "bad_blocks": { "type": "array", "items": { "type": "object", "properties": {
                            "vm_name": { "type": "string" }, "disk_id": { "type": "integer" },
                            "backup_id": { "type": "string", "description": "The point whose own layer holds the block." },
                            "offset": { "type": "integer" }, "length": { "type": "integer" },
                            "image": { "type": ["string", "null"], "description": "The image file holding its bytes, relative to the repository." },
                            "host_offset": { "type": ["integer", "null"] }, "compressed": { "type": "boolean" },
                            "affected": { "type": "array", "items": { "type": "string" }, "description": "Later points that read this block through the chain." },
                            "message": { "type": "string" }
                        } } },
                        "problems": { "type": "array", "items": { "type": "string" } }
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
                    "required": ["backup_id", "disk_id", "vm_name", "disk_key", "capacity_bytes", "mode", "reason", "parent_backup_id", "chain_id", "image", "status", "change_id", "digest", "deep_verify", "bytes_transferred", "size_on_disk", "started_at", "completed_at", "error"],
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
                        "digest": { "type": ["string", "null"], "description": "What the point reads, cvblk2-blake3:<hex> (docs/layout.md, \"Block digests\"); recorded with the change_id. Null for points made before chainvault kept digests, and for imports." },
                        "deep_verify": { "type": ["object", "null"], "description": "The last deep verify of the point: at, ok, first_bad_offset, message. A point with ok false is never a parent.", "properties": { "at": { "type": "string" }, "ok": { "type": "boolean" }, "first_bad_offset": { "type": ["integer", "null"] }, "message": { "type": ["string", "null"] } } },
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
                "TokenRequest": {
                    "type": "object",
                    "required": ["name", "role"],
                    "properties": {
                        "name": { "type": "string", "pattern": "^[A-Za-z0-9._@-]{1,64}$" },
                        "role": { "type": "string", "enum": ["admin", "backup", "restore", "audit"] },
                        "vms": { "type": "array", "items": { "type": "string" }, "description": "VM names or glob patterns (* and ?) the token is limited to; empty or absent: every VM." }
                    }
                },
                "TokenView": {
                    "type": "object",
                    "required": ["name", "role", "vms", "created_at"],
                    "properties": {
                        "name": { "type": "string" },
                        "role": { "type": "string", "enum": ["admin", "backup", "restore", "audit"] },
                        "vms": { "type": "array", "items": { "type": "string" } },
                        "created_at": { "type": "string", "format": "date-time" }
                    }
                },
                "TokenCreated": {
                    "type": "object",
                    "required": ["name", "role", "vms", "created_at", "token"],
                    "properties": {
                        "name": { "type": "string" },
                        "role": { "type": "string", "enum": ["admin", "backup", "restore", "audit"] },
                        "vms": { "type": "array", "items": { "type": "string" } },
                        "created_at": { "type": "string", "format": "date-time" },
                        "token": { "type": "string", "description": "The secret (cvt_ and 64 hex digits): send it as Authorization: Bearer <token>. Shown only here." }
                    }
                },
                "TokenList": {
                    "type": "object",
                    "required": ["tokens"],
                    "properties": { "tokens": { "type": "array", "items": r("TokenView") } }
                },
                "DeletedResponse": {
                    "type": "object",
                    "required": ["status", "message", "timestamp"],
                    "properties": {
                        "status": { "type": "string", "enum": ["deleted", "closed", "revoked"] },
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
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "writable": { "type": "boolean", "description": "Instant recovery: serve the point read-write through a scratch overlay in the repository; the point never changes." }
                    }
                },
                "RestoreView": {
                    "type": "object",
                    "required": ["restore_id", "backup_id", "disk_id", "export_name", "nbd_uri", "size", "created_at"],
                    "properties": {
                        "restore_id": { "type": "string" },
                        "backup_id": { "type": "string" },
                        "vm_name": { "type": "string" },
                        "disk_id": { "type": "integer", "minimum": 0 },
                        "export_name": { "type": "string" },
                        "nbd_uri": { "type": "string", "description": "NBD export of the point in time (the whole chain below it): read-only, or writable through the overlay of an instant restore." },
                        "size": { "type": "integer", "minimum": 0 },
                        "created_at": { "type": "string", "format": "date-time" },
                        "writable": { "type": "boolean" },
                        "overlay_bytes": { "type": "integer", "description": "Instant restores: bytes the scratch overlay occupies." }
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
            "/api/v1/verify/deep": {
                "post": {
                    "operationId": "deepVerify",
                    "summary": "Deep verify: read every block each point's own layer holds, through its chain, and compare it with its recorded block digest. Bad blocks are named (point, offset, image file and host offset, later points that read them); each point's result is kept (deep_verify in its record) and a bad point is never a parent again. Answers when done.",
                    "requestBody": body("DeepVerifyRequest", json!({ "vm_name": "pgtest1", "rate_mib_s": 200 })),
                    "responses": responses(ok("What was found.", r("DeepVerifyReport")), &[
                        ("400", BAD_BODY),
                        ("413", TOO_LARGE),
                        ("415", BAD_TYPE)
                    ])
                }
            },
            "/api/v1/backups/{backup_id}/disks/{disk_id}/digests": {
                "parameters": [ path_param("backup_id", "A completed backup."), path_param("disk_id", "One of its disks.") ],
                "get": {
                    "operationId": "pointDigests",
                    "summary": "The point's block digests, resolved through its chain, as a whole digest file (application/octet-stream; docs/layout.md, \"Block digests\"). A transfer client builds the digest of an incremental on them.",
                    "responses": {
                        "200": { "description": "The digest file.", "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
                        "404": { "description": "No such backup or disk.", "content": { "application/json": { "schema": r("Error") } } },
                        "409": { "description": "The disk is not completed, or its point has no block digests recorded.", "content": { "application/json": { "schema": r("Error") } } }
                    }
                }
            },
            "/api/v1/backups/{backup_id}/disks/{disk_id}/source-digests": {
                "parameters": [ path_param("backup_id", "A running backup."), path_param("disk_id", "One of its running disks.") ],
                "put": {
                    "operationId": "putSourceDigests",
                    "summary": "Before completing a disk: the block digests of every block the client read or zeroed, as a layer digest file (application/octet-stream). At completion the daemon compares each with the stored point and fails the disk at the first that differs, naming its offset.",
                    "requestBody": { "required": true, "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
                    "responses": {
                        "200": { "description": "Taken: the number of blocks.", "content": { "application/json": { "schema": { "type": "object", "properties": { "blocks": { "type": "integer" } } } } } },
                        "400": { "description": "Not a digest file, damaged, of another disk size, or not of kind layer.", "content": { "application/json": { "schema": r("Error") } } },
                        "404": { "description": "No such backup or disk.", "content": { "application/json": { "schema": r("Error") } } },
                        "409": { "description": "The disk is not running.", "content": { "application/json": { "schema": r("Error") } } },
                        "413": { "description": "Larger than a digest file of this disk can be.", "content": { "application/json": { "schema": r("Error") } } }
                    }
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
            "/api/v1/tokens": {
                "get": {
                    "operationId": "listTokens",
                    "summary": "Every API token: name, role, the VMs it is limited to, when it was made. Never the secrets. Admin only.",
                    "responses": responses(ok("The tokens.", r("TokenList")), &[])
                },
                "post": {
                    "operationId": "createToken",
                    "summary": "Make a token. The answer is the only place its secret appears; the catalog keeps its hash. Admin only.",
                    "requestBody": body("TokenRequest", json!({ "name": "vcenter-backup", "role": "backup", "vms": ["web-*"] })),
                    "responses": {
                        "201": ok("The token, with its secret.", r("TokenCreated")),
                        "400": err("A bad name, role or VM pattern."),
                        "401": err("No valid token."),
                        "403": err("Not an admin token, or one limited to VMs."),
                        "409": err("A token of that name exists.")
                    }
                }
            },
            "/api/v1/tokens/{name}": {
                "parameters": [ path_param("name", "The token's name.") ],
                "delete": {
                    "operationId": "revokeToken",
                    "summary": "Revoke a token: requests with it are refused (401) from now on. Admin only.",
                    "responses": responses(ok("Revoked.", r("DeletedResponse")), &[
                        ("404", "No token of that name.")
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
                    "summary": "Prometheus text exposition: chainvault_backups{status}, chainvault_bytes_received_total, chainvault_active_exports, chainvault_active_restores, chainvault_repository_bytes, chainvault_repository_free_bytes, chainvault_vm_bytes{vm}, chainvault_vm_points{vm}.",
                    "responses": responses(json!({
                        "description": "Metrics in the Prometheus text format 0.0.4.",
                        "content": { "text/plain": { "schema": { "type": "string" } } }
                    }), &[])
                }
            }
        }
    })
}
