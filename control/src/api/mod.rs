//! The management REST API.
//!
//! Each resource family is one module with a `router()` returning an
//! [`OpenApiRouter`]: its routes and their OpenAPI description come from the
//! same code, so the published spec cannot drift from what is served. Adding
//! a resource is one module plus one `.merge()`/`.nest()` line below.
//! Handlers only read and write the store; they never call a data plane.

pub mod access_rules;
pub mod address_groups;
pub mod audit;
pub mod auth;
pub mod backup_policies;
pub mod backups;
pub mod console;
pub mod docs;
pub mod events;
pub mod external_networks;
pub mod extract;
pub mod floating_ips;
pub mod health;
pub mod hosts;
pub mod idempotency;
pub mod images;
pub mod listing;
pub mod loadbalancers;
pub mod mirror_sessions;
pub mod networks;
pub mod port_sets;
pub mod ports;
pub mod problem;
pub mod protection_groups;
pub mod qos_policies;
pub mod records;
pub mod replica_groups;
pub mod respond;
pub mod roles;
pub mod router_rules;
pub mod routers;
pub mod security_groups;
pub mod tasks;
pub mod tokens;
pub mod totp;
pub mod users;
pub mod vdcs;
pub mod version;
pub mod vm_backups;
pub mod vm_snapshots;
pub mod vm_volumes;
pub mod vms;
pub mod volumes;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{middleware, Json, Router};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::store::Store;

/// Requests bigger than this are refused before a handler runs; bulk data
/// (images) will get its own chunked upload routes with their own limit.
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// A request still running after this is cut off with 503, so one stuck
/// client cannot hold a connection (and a graceful shutdown) forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keel management API",
        description = "Management REST API of a keel compute host. Errors are RFC 9457 problem details (application/problem+json)."
    ),
    components(schemas(problem::Problem)),
    modifiers(&BearerAuth),
    tags(
        (name = "system", description = "Health and version of this keel"),
        (name = "auth", description = "Login, refresh and API tokens"),
        (name = "tenancy", description = "VDCs (with quotas) and users"),
        (name = "networks", description = "VPCs, subnets, routers, security groups and ports; PENDING until a data plane realizes them"),
        (name = "compute", description = "Hosts, images (chunked upload), volumes, VMs and their asynchronous tasks"),
        (name = "events", description = "Change feed (also as Server-Sent Events) and audit log"),
    )
)]
struct ApiDoc;

/// Declares the `bearer` scheme the operations refer to.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// The host's state directory (images, VM and volume files live below).
    pub state_dir: Arc<std::path::PathBuf>,
    pub version: Arc<version::Version>,
    /// Woken after every mutating call, so event streams look for news.
    pub changes: Arc<tokio::sync::Notify>,
    /// One-time console tickets (in memory: they live for seconds).
    pub consoles: console::Tickets,
    /// The shared database URL handed to hosts that join with an API token
    /// (`POST /hosts/enroll`); `None` on an embedded SQLite store, which no
    /// other host can share.
    pub host_database: Option<Arc<String>>,
}

impl AppState {
    pub fn new(store: Store, version: version::Version, state_dir: std::path::PathBuf) -> AppState {
        AppState {
            store,
            state_dir: Arc::new(state_dir),
            version: Arc::new(version),
            changes: Arc::new(tokio::sync::Notify::new()),
            consoles: console::Tickets::default(),
            host_database: None,
        }
    }

    /// Lets hosts join this control plane: they are told `url`.
    pub fn with_host_database(mut self, url: Option<String>) -> AppState {
        self.host_database = url.map(Arc::new);
        self
    }
}

fn parts() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::router())
        .nest(
            "/api/v1",
            OpenApiRouter::new()
                .merge(version::router())
                .merge(auth::router())
                .merge(totp::router())
                .merge(tokens::router())
                .merge(vdcs::router())
                .merge(users::router())
                .merge(roles::router())
                .merge(access_rules::router())
                .merge(networks::router())
                .merge(security_groups::router())
                .merge(address_groups::router())
                .merge(port_sets::router())
                .merge(ports::router())
                .merge(routers::router())
                .merge(external_networks::router())
                .merge(floating_ips::router())
                .merge(qos_policies::router())
                .merge(mirror_sessions::router())
                .merge(hosts::router())
                .merge(images::router())
                .merge(volumes::router())
                .merge(vms::router())
                .merge(vm_snapshots::router())
                .merge(vm_backups::router())
                .merge(vm_volumes::router())
                .merge(loadbalancers::router())
                .merge(backups::router())
                .merge(backup_policies::router())
                .merge(protection_groups::router())
                .merge(replica_groups::router())
                .merge(console::router())
                .merge(tasks::router())
                .merge(events::router())
                .merge(audit::router()),
        )
        .split_for_parts();
    let mut spec = spec;
    document_common_errors(&mut spec);
    (router, spec)
}

/// Adds the error answers any operation can give, where its own
/// description does not already: 400 (malformed JSON, query or content
/// type), 401/403 (operations behind the bearer token), 404 (a path id),
/// 422 (a body field or header), 412/428 (If-Match). One place, so no
/// handler can forget them.
fn document_common_errors(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let problem = |why: &str| {
        ResponseBuilder::new()
            .description(why)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build()
    };
    for (path, item) in spec.paths.paths.iter_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let mut common = vec![("400", "Malformed request: JSON, query or content type")];
            if secured {
                common.push((
                    "401",
                    "Not authenticated (missing, expired or revoked token)",
                ));
                common.push(("403", "Not allowed for the caller's role"));
            }
            if path.contains('{') {
                common.push(("404", "Not found (or not visible to the caller)"));
            }
            let if_match = op
                .parameters
                .iter()
                .flatten()
                .any(|p| p.name.eq_ignore_ascii_case("if-match"));
            if op.request_body.is_some() || if_match {
                common.push(("422", "Invalid field or header (the problem names it)"));
            }
            if if_match {
                common.push(("412", "Changed since it was read (If-Match)"));
                common.push(("428", "If-Match missing"));
            }
            for (code, why) in common {
                op.responses
                    .responses
                    .entry(code.to_owned())
                    .or_insert_with(|| problem(why).into());
            }
        }
    }
}

/// The OpenAPI document of everything [`app`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    parts().1
}

/// The whole API as one router, with its limits and tracing as layers.
pub fn app(state: AppState) -> Router {
    let (router, spec) = parts();
    let page = serde_json::to_value(&spec)
        .map(|v| docs::render(&v))
        .unwrap_or_default();
    let page = Arc::new(page);
    let spec = Arc::new(spec);
    router
        .route(
            "/api/v1/openapi.json",
            get(move || async move { Json(spec.as_ref().clone()) }),
        )
        .route(
            "/api/v1/docs",
            get(move || async move { axum::response::Html(page.as_ref().clone()) }),
        )
        // Innermost to outermost; the problem rewrite wraps every layer that
        // can answer on its own, so their bare errors get a problem body too.
        .layer(CatchPanicLayer::new())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::replay_or_record,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::identify,
        ))
        // Before authentication: a shut-out address learns nothing.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access_rules::enforce,
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(RequestBodyLimitLayer::new(MAX_REQUEST_BODY))
        .layer(middleware::from_fn(problem::problem_for_bare_errors))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod contract_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_tree_openapi_document_is_current() {
        let generated = openapi().to_pretty_json().unwrap();
        let in_tree = include_str!("../../openapi.json");
        assert!(
            generated.trim() == in_tree.trim(),
            "control/openapi.json is stale: run `cargo run -p keel -- openapi > control/openapi.json`"
        );
    }

    #[test]
    fn every_operation_documents_its_responses() {
        let spec = openapi();
        assert!(!spec.paths.paths.is_empty());
        for (path, item) in &spec.paths.paths {
            let ops = [&item.get, &item.put, &item.post, &item.delete, &item.patch];
            for op in ops.into_iter().flatten() {
                assert!(
                    !op.responses.responses.is_empty(),
                    "{path} has no responses"
                );
                assert!(
                    op.tags.as_ref().is_some_and(|t| !t.is_empty()),
                    "{path} has no tag"
                );
            }
        }
    }
}
