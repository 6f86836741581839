//! The resource kinds the CLI knows: their API path and the columns of
//! their table.

use anyhow::bail;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde_json::Value;

pub struct Kind {
    pub name: &'static str,
    pub path: &'static str,
    pub columns: &'static [&'static str],
}

const COMMON: &[&str] = &["id", "name", "status"];

pub const ALL: &[Kind] = &[
    Kind {
        name: "vdcs",
        path: "/api/v1/vdcs",
        columns: &["id", "name", "status", "parent_id"],
    },
    Kind {
        name: "users",
        path: "/api/v1/users",
        columns: &["id", "name", "role", "role_id", "vdc_id", "totp_enabled"],
    },
    Kind {
        name: "roles",
        path: "/api/v1/roles",
        columns: &["id", "name", "description"],
    },
    Kind {
        name: "access-rules",
        path: "/api/v1/access-rules",
        columns: &["id", "name", "cidr", "action"],
    },
    Kind {
        name: "hosts",
        path: "/api/v1/hosts",
        columns: &[
            "id",
            "name",
            "status",
            "responding",
            "cpu_arch",
            "cores",
            "memory_bytes",
        ],
    },
    Kind {
        name: "images",
        path: "/api/v1/images",
        columns: &["id", "name", "status", "format", "size_bytes"],
    },
    Kind {
        name: "volumes",
        path: "/api/v1/volumes",
        columns: &["id", "name", "status", "size_bytes", "attached_to"],
    },
    Kind {
        name: "vms",
        path: "/api/v1/vms",
        columns: &["id", "name", "status", "vcpus", "memory_mib", "host_id"],
    },
    Kind {
        name: "backups",
        path: "/api/v1/backups",
        columns: &["id", "name", "status", "volume_id", "kind", "chunks_read"],
    },
    Kind {
        name: "vm-backups",
        path: "/api/v1/vm-backups",
        columns: &["id", "name", "status", "vm_id", "vm_name", "bytes_stored"],
    },
    Kind {
        name: "vpcs",
        path: "/api/v1/vpcs",
        columns: COMMON,
    },
    Kind {
        name: "subnets",
        path: "/api/v1/subnets",
        columns: &["id", "name", "status", "cidr", "vpc_id"],
    },
    Kind {
        name: "ports",
        path: "/api/v1/ports",
        columns: &[
            "id",
            "name",
            "status",
            "fixed_ip",
            "mac_address",
            "device_id",
        ],
    },
    Kind {
        name: "routers",
        path: "/api/v1/routers",
        columns: COMMON,
    },
    Kind {
        name: "security-groups",
        path: "/api/v1/security-groups",
        columns: COMMON,
    },
    Kind {
        name: "external-networks",
        path: "/api/v1/external-networks",
        columns: &["id", "name", "status", "physical_network", "cidr"],
    },
    Kind {
        name: "mirror-sessions",
        path: "/api/v1/mirror-sessions",
        columns: &["id", "name", "status", "direction", "target_port_id"],
    },
    Kind {
        name: "qos-policies",
        path: "/api/v1/qos-policies",
        columns: &["id", "name", "dscp_mark"],
    },
    Kind {
        name: "floating-ips",
        path: "/api/v1/floating-ips",
        columns: &[
            "id",
            "status",
            "floating_ip_address",
            "fixed_ip_address",
            "port_id",
        ],
    },
    Kind {
        name: "loadbalancers",
        path: "/api/v1/loadbalancers",
        columns: &["id", "name", "status", "vip_address"],
    },
    Kind {
        name: "tasks",
        path: "/api/v1/tasks",
        columns: &[
            "id",
            "resource_type",
            "resource_id",
            "action",
            "state",
            "progress",
            "host_id",
            "message",
        ],
    },
];

/// Kinds created under another resource (`keel create backups --of VOLUME`):
/// the kind, what it is made of, and the collection path with `{}` for it.
const CREATED_UNDER: &[(&str, &str, &str)] = &[
    ("backups", "a volume", "/api/v1/volumes/{}/backups"),
    ("vm-backups", "a VM", "/api/v1/vms/{}/backups"),
];

/// Where `kind` is created: its own collection, or the one under the
/// resource `of` names for kinds made of another.
pub fn create_path(kind: &Kind, of: Option<&str>) -> anyhow::Result<String> {
    match (CREATED_UNDER.iter().find(|(k, _, _)| *k == kind.name), of) {
        (Some((_, _, path)), Some(id)) => Ok(path.replace("{}", id)),
        (Some((name, source, _)), None) => {
            bail!("{name} are made of {source}: name it with --of ID")
        }
        (None, Some(_)) => bail!("{} are not made of another resource: drop --of", kind.name),
        (None, None) => Ok(kind.path.to_owned()),
    }
}

/// A kind by its name; singular and plural both work.
pub fn find(name: &str) -> anyhow::Result<&'static Kind> {
    let plural = if name.ends_with('s') {
        name.to_owned()
    } else {
        format!("{name}s")
    };
    match ALL.iter().find(|k| k.name == name || k.name == plural) {
        Some(k) => Ok(k),
        None => bail!(
            "unknown resource kind {name:?}; one of: {}",
            ALL.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One row per item, the kind's columns.
pub fn table(kind: &Kind, items: &[Value]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(kind.columns.iter().copied());
    for item in items {
        t.add_row(kind.columns.iter().map(|c| cell(&item[*c])));
    }
    format!("{t}\n")
}

/// One resource as field/value rows.
pub fn fields_table(body: &Value) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(["field", "value"]);
    if let Some(map) = body.as_object() {
        for (k, v) in map {
            t.add_row([k.clone(), cell(v)]);
        }
    }
    format!("{t}\n")
}
