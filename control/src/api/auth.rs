//! Identity and access: who is calling (bearer tokens), what each role may
//! do (the one [`POLICY`] table), login/refresh, and first-start bootstrap.
//!
//! Tenancy rule: a resource outside the caller's VDC does not exist for the
//! caller (404), so ids of other tenants cannot be probed; a visible
//! resource the role may not touch answers 403.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::ValidJson;
use super::problem::{ApiError, Problem};
use super::records::now_ms;
use super::AppState;

/// Access tokens are short-lived; a client renews them with its refresh token.
pub const ACCESS_TTL_MS: i64 = 15 * 60 * 1000;
pub const REFRESH_TTL_MS: i64 = 24 * 60 * 60 * 1000;
/// Consecutive failed logins before the account locks, and for how long.
pub const LOCKOUT_AFTER: i64 = 5;
pub const LOCKOUT_MS: i64 = 15 * 60 * 1000;
pub const MIN_PASSWORD: usize = 12;
pub const MAX_PASSWORD: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    SystemAdmin,
    VdcAdmin,
    VdcUser,
    /// A VDC role whose permissions are a custom role's (`/roles`).
    Custom,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::SystemAdmin => "system-admin",
            Role::VdcAdmin => "vdc-admin",
            Role::VdcUser => "vdc-user",
            Role::Custom => "custom",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        [
            Role::SystemAdmin,
            Role::VdcAdmin,
            Role::VdcUser,
            Role::Custom,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// Resource families named by the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Vdc,
    User,
    Token,
    Network,
    /// VMs, volumes, images and their tasks.
    Compute,
    /// Compute hosts (infrastructure: system admins only).
    Host,
    Event,
    Audit,
    /// Custom role definitions (system admins only).
    Role,
    /// API access rules by client address (system admins only).
    Access,
    /// External (provider) networks: system admins define them, every
    /// tenant reads them to pick one for a floating IP or router gateway.
    ExternalNetwork,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Read,
    Create,
    Update,
    Delete,
}

use Action::{Create, Delete, Read, Update};
const ALL: &[Action] = &[Read, Create, Update, Delete];

/// The one policy table: which role may do what on which family. Scope is
/// always the caller's own VDC for VDC roles (enforced by visibility).
/// Tokens are the caller's own for every role.
pub const POLICY: &[(Role, Family, &[Action])] = &[
    (Role::SystemAdmin, Family::Vdc, ALL),
    (Role::SystemAdmin, Family::User, ALL),
    (Role::SystemAdmin, Family::Token, ALL),
    (Role::SystemAdmin, Family::Network, ALL),
    (Role::SystemAdmin, Family::Compute, ALL),
    (Role::SystemAdmin, Family::Host, &[Read, Create, Update]),
    (Role::SystemAdmin, Family::Event, &[Read]),
    (Role::SystemAdmin, Family::Audit, &[Read]),
    (Role::SystemAdmin, Family::Role, ALL),
    (Role::SystemAdmin, Family::Access, ALL),
    (Role::SystemAdmin, Family::ExternalNetwork, ALL),
    (Role::VdcAdmin, Family::Vdc, &[Read]),
    (Role::VdcAdmin, Family::User, ALL),
    (Role::VdcAdmin, Family::Token, ALL),
    (Role::VdcAdmin, Family::Network, ALL),
    (Role::VdcAdmin, Family::ExternalNetwork, &[Read]),
    (Role::VdcAdmin, Family::Compute, ALL),
    (Role::VdcAdmin, Family::Event, &[Read]),
    (Role::VdcUser, Family::Vdc, &[Read]),
    (Role::VdcUser, Family::User, &[Read]),
    (Role::VdcUser, Family::Token, ALL),
    (Role::VdcUser, Family::Network, ALL),
    (Role::VdcUser, Family::ExternalNetwork, &[Read]),
    (Role::VdcUser, Family::Compute, ALL),
    (Role::VdcUser, Family::Event, &[Read]),
];

pub fn permitted(role: Role, family: Family, action: Action) -> bool {
    POLICY
        .iter()
        .any(|(r, f, actions)| *r == role && *f == family && actions.contains(&action))
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub name: String,
    pub role: Role,
    /// The VDC of a VDC role; `None` for system admins.
    pub vdc_id: Option<String>,
    /// What a [`Role::Custom`] user may do (its role's permissions, read at
    /// every request, so a role change applies at once).
    pub grants: std::sync::Arc<[(Family, Action)]>,
}

impl Principal {
    /// Tenants see only their own VDC; system admins see everything.
    pub fn sees(&self, vdc_id: Option<&str>) -> bool {
        match self.role {
            Role::SystemAdmin => true,
            _ => self.vdc_id.is_some() && self.vdc_id.as_deref() == vdc_id,
        }
    }

    /// Authorizes `action` on a resource owned by `vdc_id`: 404 if it is
    /// invisible to the caller, 403 if visible but not permitted.
    pub fn authorize(
        &self,
        family: Family,
        action: Action,
        vdc_id: Option<&str>,
    ) -> Result<(), ApiError> {
        if !self.sees(vdc_id) {
            return Err(ApiError::NotFound);
        }
        self.require(family, action)
    }

    /// Authorizes an action not tied to one resource (list, create).
    pub fn require(&self, family: Family, action: Action) -> Result<(), ApiError> {
        let allowed = match self.role {
            Role::Custom => self.grants.contains(&(family, action)),
            role => permitted(role, family, action),
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// The VDC a tenant's lists are restricted to.
    pub fn list_scope(&self) -> Option<&str> {
        match self.role {
            Role::SystemAdmin => None,
            _ => Some(self.vdc_id.as_deref().unwrap_or("")),
        }
    }
}

/// Handlers that take a `Principal` require authentication.
impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or(ApiError::Unauthenticated)
    }
}

pub fn hash_token(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// 244 random bits from the OS generator (two v4 UUIDs).
pub fn new_secret(prefix: &str) -> String {
    format!(
        "{prefix}_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Middleware: resolves `Authorization: Bearer` into a [`Principal`]
/// request extension. A missing header leaves the request anonymous (public
/// routes); a present but invalid one is refused here.
pub async fn identify(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return next.run(req).await;
    };
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    match lookup(&state, secret, &["access", "api"]).await {
        Ok(Some(principal)) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Ok(None) => ApiError::Unauthenticated.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn lookup(
    state: &AppState,
    secret: &str,
    kinds: &[&str],
) -> Result<Option<Principal>, ApiError> {
    let row = sqlx::query(
        "SELECT u.id, u.name, u.role, u.vdc_id, u.role_id, t.kind FROM tokens t \
         JOIN users u ON u.id = t.user_id \
         WHERE t.hash = $1 AND (t.expires_at IS NULL OR t.expires_at > $2)",
    )
    .bind(hash_token(secret))
    .bind(now_ms())
    .fetch_optional(state.store.pool())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let kind: String = row.try_get("kind")?;
    if !kinds.contains(&kind.as_str()) {
        return Ok(None);
    }
    let role: String = row.try_get("role")?;
    let role = Role::parse(&role).ok_or_else(|| ApiError::Internal(format!("role {role}")))?;
    let grants = match (role, row.try_get::<Option<String>, _>("role_id")?) {
        (Role::Custom, Some(role_id)) => {
            let mut conn = state.store.pool().acquire().await?;
            super::roles::grants(&mut conn, &role_id).await?
        }
        _ => Vec::new(),
    };
    Ok(Some(Principal {
        user_id: row.try_get("id")?,
        name: row.try_get("name")?,
        role,
        vdc_id: row.try_get("vdc_id")?,
        grants: grants.into(),
    }))
}

pub fn check_password_policy(user: &str, password: &str) -> Result<(), ApiError> {
    let len = password.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&len) {
        return Err(ApiError::invalid(
            "password",
            format!("must be {MIN_PASSWORD}-{MAX_PASSWORD} characters"),
        ));
    }
    if password.to_lowercase().contains(&user.to_lowercase()) {
        return Err(ApiError::invalid(
            "password",
            "must not contain the user name",
        ));
    }
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ];
    if classes.iter().filter(|c| **c).count() < 2 {
        return Err(ApiError::invalid(
            "password",
            "must mix at least two of: lower case, upper case, digits, symbols",
        ));
    }
    Ok(())
}

/// argon2id with the crate's recommended parameters, off the async threads.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::Internal(format!("hash password: {e}")))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("hash task: {e}")))?
}

async fn verify_password(password: String, hash: String) -> Result<bool, ApiError> {
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&hash)
            .map_err(|e| ApiError::Internal(format!("stored hash: {e}")))?;
        Ok(Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("verify task: {e}")))?
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    pub password: String,
    /// The current TOTP code, for users who turned TOTP on.
    #[serde(default)]
    pub totp: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    pub refresh_token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Tokens {
    /// Bearer token for `Authorization: Bearer ...`.
    pub access_token: String,
    /// Exchanged once for a new pair at `/api/v1/auth/refresh`.
    pub refresh_token: String,
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
}

async fn issue_pair(state: &AppState, user_id: &str) -> Result<Tokens, ApiError> {
    let access = new_secret("keela");
    let refresh = new_secret("keelr");
    let now = now_ms();
    let mut tx = state.store.begin_write().await?;
    // Expired session tokens are swept here rather than by a timer.
    sqlx::query("DELETE FROM tokens WHERE expires_at IS NOT NULL AND expires_at < $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    for (kind, secret, ttl) in [
        ("access", &access, ACCESS_TTL_MS),
        ("refresh", &refresh, REFRESH_TTL_MS),
    ] {
        sqlx::query(
            "INSERT INTO tokens (id, user_id, kind, name, hash, expires_at, created_at) \
             VALUES ($1, $2, $3, 'session', $4, $5, $6)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(user_id)
        .bind(kind)
        .bind(hash_token(secret))
        .bind(now + ttl)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Tokens {
        access_token: access,
        refresh_token: refresh,
        token_type: "Bearer".into(),
        expires_in: ACCESS_TTL_MS / 1000,
    })
}

/// Exchanges a user name and password for a token pair.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = Login,
    responses(
        (status = 200, description = "Logged in", body = Tokens),
        (status = 401, description = "Wrong user, password or TOTP code (bad-credentials), or the account needs a TOTP code (totp-required)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Account locked after failed logins", body = Problem, content_type = "application/problem+json"),
    ))]
async fn login(
    State(state): State<AppState>,
    ValidJson(body): ValidJson<Login>,
) -> Result<Json<Tokens>, ApiError> {
    let row = sqlx::query(
        "SELECT id, password_hash, failed_logins, locked_until FROM users WHERE name = $1",
    )
    .bind(&body.username)
    .fetch_optional(state.store.pool())
    .await?;
    let Some(row) = row else {
        // Same work as a real check, so timing does not reveal which names exist.
        let _ = hash_password(body.password).await;
        return Err(ApiError::BadCredentials);
    };
    let id: String = row.try_get("id")?;
    let locked_until: i64 = row.try_get("locked_until")?;
    if locked_until > now_ms() {
        return Err(ApiError::AccountLocked);
    }
    let hash: String = row.try_get("password_hash")?;
    let password_ok = verify_password(body.password, hash).await?;
    // With TOTP on, a wrong or replayed code is a failed login like a wrong
    // password (it counts towards the lockout); a missing one is asked for.
    let mut second_ok = true;
    if password_ok {
        let mut conn = state.store.pool().acquire().await?;
        if let Some((secret, last)) = super::totp::second_factor(&mut conn, &id).await? {
            let Some(code) = body.totp.as_deref() else {
                return Err(ApiError::TotpRequired);
            };
            second_ok = match super::totp::step_of(&secret, code.trim(), last)? {
                Some(step) => super::totp::consume_step(&mut conn, &id, step).await?,
                None => false,
            };
        }
    }
    if !password_ok || !second_ok {
        // One statement, so concurrent failures all count.
        sqlx::query(
            "UPDATE users SET failed_logins = failed_logins + 1, \
             locked_until = CASE WHEN failed_logins + 1 >= $1 THEN $2 ELSE locked_until END \
             WHERE id = $3",
        )
        .bind(LOCKOUT_AFTER)
        .bind(now_ms() + LOCKOUT_MS)
        .bind(&id)
        .execute(state.store.pool())
        .await?;
        return Err(ApiError::BadCredentials);
    }
    sqlx::query("UPDATE users SET failed_logins = 0, locked_until = 0 WHERE id = $1")
        .bind(&id)
        .execute(state.store.pool())
        .await?;
    Ok(Json(issue_pair(&state, &id).await?))
}

/// Exchanges a refresh token (once) for a new token pair.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = Refresh,
    responses(
        (status = 200, description = "New token pair", body = Tokens),
        (status = 401, description = "Unknown, used or expired refresh token", body = Problem, content_type = "application/problem+json"),
    ))]
async fn refresh(
    State(state): State<AppState>,
    ValidJson(body): ValidJson<Refresh>,
) -> Result<Json<Tokens>, ApiError> {
    let principal = lookup(&state, &body.refresh_token, &["refresh"])
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    // Single use: a replayed refresh token finds nothing.
    let used = sqlx::query("DELETE FROM tokens WHERE hash = $1 AND kind = 'refresh'")
        .bind(hash_token(&body.refresh_token))
        .execute(state.store.pool())
        .await?;
    if used.rows_affected() == 0 {
        return Err(ApiError::Unauthenticated);
    }
    Ok(Json(issue_pair(&state, &principal.user_id).await?))
}

/// On the first start (no users yet) creates `admin`, a system admin whose
/// password is `KEEL_ADMIN_PASSWORD` or generated. Returns the generated
/// password so the caller can write it to a file; never logged.
pub async fn bootstrap_admin(
    store: &crate::store::Store,
    from_env: Option<String>,
) -> Result<Option<String>, ApiError> {
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(store.pool())
        .await?;
    if users > 0 {
        return Ok(None);
    }
    let (password, generated) = match from_env {
        Some(p) => {
            check_password_policy("admin", &p)?;
            (p, false)
        }
        None => (format!("K{}-", uuid::Uuid::new_v4().simple()), true),
    };
    let hash = hash_password(password.clone()).await?;
    let now = now_ms();
    let id = uuid::Uuid::new_v4().to_string();
    let mut tx = store.begin_write().await?;
    sqlx::query(
        "INSERT INTO users (id, name, password_hash, role, vdc_id, revision, created_at, updated_at) \
         VALUES ($1, 'admin', $2, 'system-admin', NULL, 1, $3, $4)",
    )
    .bind(&id)
    .bind(hash)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    super::records::append_event(&mut tx, "user", &id, "created", None, 1).await?;
    tx.commit().await?;
    Ok(generated.then_some(password))
}
