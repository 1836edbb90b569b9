//! Users, passwords (Argon2id), bearer tokens and roles.
//!
//! Tokens are 256-bit random values handed to the client once; only their
//! SHA-256 is stored, so a copy of the database does not grant access.

use crate::error::{ApiError, ApiResult};
use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use axum::http::StatusCode;
use pairvisor_agent::now;
use pairvisor_model::names::validate_name;
use pairvisor_model::roles::{Access, Role};
use pairvisor_store::{Store, TokenRecord, UserRecord};
use sha2::{Digest, Sha256};

/// How long a login lasts.
pub const TOKEN_LIFETIME_SECS: u64 = 12 * 3600;
/// Shortest password accepted.
pub const MIN_PASSWORD_LEN: usize = 8;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct AuthUser {
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
}

impl AuthUser {
    /// Refuses the request unless the caller's role allows `access`.
    pub fn require(&self, access: Access) -> ApiResult<()> {
        if self.role.allows(access) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "user '{}' has role {}, which may not {access}; this needs {}",
                    self.name,
                    self.role,
                    match access {
                        Access::Read => "any role",
                        Access::Operate => "role operator or administrator",
                        Access::Administer => "role administrator",
                    }
                ),
            ))
        }
    }
}

/// Hashes a password with Argon2id and a random salt.
pub fn hash_password(password: &str) -> ApiResult<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn check_password_rules(password: &str) -> ApiResult<()> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(ApiError::invalid(format!(
            "password is too short; use at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    Ok(())
}

/// Creates a user (validated name, password rules, unique).
pub fn create_user(store: &Store, name: &str, role: Role, password: &str) -> ApiResult<UserRecord> {
    validate_name("user", name)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", e.to_string()))?;
    check_password_rules(password)?;
    let rec = UserRecord {
        name: name.to_string(),
        role,
        password_hash: hash_password(password)?,
        created_at: now(),
    };
    store.write(|tx| {
        if tx.get::<UserRecord>(name)?.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("user '{name}' already exists; choose another name"),
            ));
        }
        tx.put(&rec)?;
        Ok(())
    })?;
    Ok(rec)
}

/// Checks credentials and issues a token.
pub fn login(store: &Store, name: &str, password: &str) -> ApiResult<(String, UserRecord)> {
    let user = store.get::<UserRecord>(name)?;
    // Verify against a dummy hash when the user does not exist, so that
    // timing does not reveal which user names exist.
    let ok = match &user {
        Some(u) => verify_password(password, &u.password_hash),
        None => {
            let dummy =
                DUMMY_HASH.get_or_init(|| hash_password("not a password").unwrap_or_default());
            let _ = verify_password(password, dummy);
            false
        }
    };
    let Some(user) = user.filter(|_| ok) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_credentials",
            "user name or password is wrong",
        ));
    };
    let token = hex::encode(rand::random::<[u8; 32]>());
    let rec = TokenRecord {
        hash: token_hash(&token),
        user: user.name.clone(),
        expires_at: now() + TOKEN_LIFETIME_SECS,
    };
    let r = store.write(|tx| {
        // Drop expired tokens while we are here.
        let t = now();
        for old in tx.list::<TokenRecord>()? {
            if old.expires_at <= t {
                tx.delete::<TokenRecord>(&old.hash)?;
            }
        }
        tx.put(&rec)
    });
    match r {
        Ok(()) => {}
        // No quorum: the administrator must still be able to log in to this
        // PM (to see what happened, or to force quorum). The token then
        // works on this PM only.
        Err(pairvisor_store::StoreError::Unit(e)) => {
            tracing::warn!("login without the unit database ({e}): token valid on this PM only");
            store.write_local(|tx| tx.put(&rec))?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok((token, user))
}

static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Resolves a bearer token to its user.
pub fn authenticate(store: &Store, token: &str) -> ApiResult<AuthUser> {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing, unknown or expired token; log in with POST /api/v1/auth/login",
        )
    };
    let hash = token_hash(token);
    let rec = match store.get::<TokenRecord>(&hash)? {
        Some(r) => r,
        None if store.is_replicated() => store
            .get_local::<TokenRecord>(&hash)?
            .ok_or_else(unauthorized)?,
        None => return Err(unauthorized()),
    };
    if rec.expires_at <= now() {
        return Err(unauthorized());
    }
    let user = store
        .get::<UserRecord>(&rec.user)?
        .ok_or_else(unauthorized)?;
    Ok(AuthUser {
        name: user.name,
        role: user.role,
    })
}

/// Revokes a token.
pub fn logout(store: &Store, token: &str) -> ApiResult<()> {
    store.write(|tx| tx.delete::<TokenRecord>(&token_hash(token)).map(|_| ()))?;
    Ok(())
}

/// Deletes a user, refusing to delete the last administrator.
pub fn delete_user(store: &Store, name: &str) -> ApiResult<()> {
    store.write(|tx| {
        let user = tx.get::<UserRecord>(name)?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("user '{name}' does not exist"))
        })?;
        if user.role == Role::Administrator {
            let admins = tx
                .list::<UserRecord>()?
                .into_iter()
                .filter(|u| u.role == Role::Administrator)
                .count();
            if admins <= 1 {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("user '{name}' is the last administrator; create another administrator first"),
                ));
            }
        }
        tx.delete::<UserRecord>(name)?;
        for t in tx.list::<TokenRecord>()? {
            if t.user == name {
                tx.delete::<TokenRecord>(&t.hash)?;
            }
        }
        Ok(())
    })
}
