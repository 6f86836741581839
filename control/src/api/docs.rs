//! `GET /api/v1/docs`: the OpenAPI document rendered as one self-contained
//! HTML page (operations by tag with their parameters, bodies and answers;
//! then every schema). Rendered here rather than by a JavaScript viewer
//! from a CDN, because an appliance on a private network may have no way
//! to fetch one.

use std::fmt::Write;

use serde_json::Value;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `#/components/schemas/Name` → `Name` as a link to its section.
fn schema_ref(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    if let Some(items) = schema.get("items") {
        return format!("array of {}", schema_ref(items));
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(list) = schema.get(key).and_then(Value::as_array) {
            let parts: Vec<String> = list.iter().map(schema_ref).collect();
            return parts.join(if key == "allOf" { " and " } else { " or " });
        }
    }
    let ty = match schema.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".to_owned(),
    };
    match schema.get("enum").and_then(Value::as_array) {
        Some(values) => {
            let vs: Vec<String> = values.iter().map(|v| esc(&v.to_string())).collect();
            format!("{ty}: {}", vs.join(", "))
        }
        None => esc(&ty),
    }
}

fn text(v: &Value, key: &str) -> String {
    esc(v.get(key).and_then(Value::as_str).unwrap_or(""))
}

fn operation(out: &mut String, method: &str, path: &str, op: &Value) {
    let _ = write!(
        out,
        "<section class=op><h3><span class=m>{}</span> {}</h3><p>{}</p>",
        method.to_uppercase(),
        esc(path),
        text(op, "summary") + &text(op, "description")
    );
    if let Some(params) = op.get("parameters").and_then(Value::as_array) {
        out.push_str("<table><tr><th>parameter</th><th>in</th><th>type</th><th></th></tr>");
        for p in params {
            let required = p.get("required").and_then(Value::as_bool) == Some(true);
            let _ = write!(
                out,
                "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                text(p, "name"),
                if required { " *" } else { "" },
                text(p, "in"),
                p.get("schema").map(schema_ref).unwrap_or_default(),
                text(p, "description")
            );
        }
        out.push_str("</table>");
    }
    if let Some(content) = op
        .pointer("/requestBody/content")
        .and_then(Value::as_object)
    {
        for (mime, media) in content {
            let _ = write!(
                out,
                "<p>Body ({}): {}</p>",
                esc(mime),
                media.get("schema").map(schema_ref).unwrap_or_default()
            );
        }
    }
    if let Some(responses) = op.get("responses").and_then(Value::as_object) {
        out.push_str("<ul>");
        for (code, r) in responses {
            let body = r
                .get("content")
                .and_then(Value::as_object)
                .and_then(|c| c.values().next())
                .and_then(|m| m.get("schema"))
                .map(|s| format!(" → {}", schema_ref(s)))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<li><b>{}</b> {}{}</li>",
                esc(code),
                text(r, "description"),
                body
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>");
}

/// The whole page for `spec` (the OpenAPI document as JSON).
pub fn render(spec: &Value) -> String {
    let title = spec
        .pointer("/info/title")
        .and_then(Value::as_str)
        .unwrap_or("API");
    let version = spec
        .pointer("/info/version")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut out = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>{0}</title><style>\
         body{{font-family:sans-serif;max-width:70em;margin:auto;padding:1em}}\
         .op{{border-top:1px solid #ccc}} .m{{font-family:monospace;color:#06c}}\
         table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:2px 6px;text-align:left}}\
         </style></head><body><h1>{0} {1}</h1>\
         <p>Machine-readable: <a href=\"/api/v1/openapi.json\">openapi.json</a>. \
         Errors are RFC 9457 problem+json with a stable <code>code</code>.</p>",
        esc(title),
        esc(version)
    );
    let mut by_tag: std::collections::BTreeMap<String, Vec<(String, String, Value)>> =
        std::collections::BTreeMap::new();
    if let Some(paths) = spec.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            let Some(item) = item.as_object() else {
                continue;
            };
            for (method, op) in item {
                let tag = op
                    .pointer("/tags/0")
                    .and_then(Value::as_str)
                    .unwrap_or("other")
                    .to_owned();
                by_tag
                    .entry(tag)
                    .or_default()
                    .push((method.clone(), path.clone(), op.clone()));
            }
        }
    }
    out.push_str("<nav><ul>");
    for tag in by_tag.keys() {
        let _ = write!(out, "<li><a href=\"#tag-{0}\">{0}</a></li>", esc(tag));
    }
    out.push_str("<li><a href=\"#schemas\">schemas</a></li></ul></nav>");
    for (tag, ops) in &by_tag {
        let _ = write!(out, "<h2 id=\"tag-{0}\">{0}</h2>", esc(tag));
        for (method, path, op) in ops {
            operation(&mut out, method, path, op);
        }
    }
    out.push_str("<h2 id=schemas>Schemas</h2>");
    if let Some(schemas) = spec
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, schema) in schemas {
            let _ = write!(
                out,
                "<section class=op id=\"schema-{0}\"><h3>{0}</h3><p>{1}</p>",
                esc(name),
                text(schema, "description")
            );
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                out.push_str("<table><tr><th>field</th><th>type</th><th></th></tr>");
                for (field, p) in props {
                    let _ = write!(
                        out,
                        "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(field),
                        if required.contains(&field.as_str()) {
                            " *"
                        } else {
                            ""
                        },
                        schema_ref(p),
                        text(p, "description")
                    );
                }
                out.push_str("</table>");
            } else {
                let _ = write!(out, "<p>{}</p>", schema_ref(schema));
            }
            out.push_str("</section>");
        }
    }
    out.push_str("</body></html>");
    out
}
