//! JWT verification (HS256 shared secret, RS256/ES256 public key) and the identity a
//! token grants: user, tenant and permissions.
//!
//! Owns token checks only. The algorithm is fixed by the configured key, so a token that
//! names another algorithm (including `none`) is refused before its signature is looked at.

use std::sync::Arc;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a token may do. A token without a `permissions` claim gets [`Perms::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms(pub(crate) u8);

impl Perms {
    /// `message:send`.
    pub const SEND: Perms = Perms(1);
    /// `room:join`.
    pub const JOIN: Perms = Perms(2);
    /// `presence:read`.
    pub const PRESENCE: Perms = Perms(4);
    /// `typing`.
    pub const TYPING: Perms = Perms(8);
    /// Every permission (`*`).
    pub const ALL: Perms = Perms(15);

    /// Parses the `permissions` claim; unknown names are ignored.
    pub fn from_claim(list: &[String]) -> Perms {
        let mut bits = 0;
        for p in list {
            bits |= match p.as_str() {
                "*" => Perms::ALL.0,
                "message:send" => Perms::SEND.0,
                "room:join" => Perms::JOIN.0,
                "presence:read" => Perms::PRESENCE.0,
                "typing" => Perms::TYPING.0,
                _ => 0,
            };
        }
        Perms(bits)
    }

    /// All bits of `p` are granted.
    pub fn allows(self, p: Perms) -> bool {
        self.0 & p.0 == p.0
    }
}

/// The claims shardgate reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Tenant id.
    #[serde(rename = "tenantId")]
    pub tenant_id: String,
    /// Granted permissions; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Tenant id.
    pub tenant: Arc<str>,
    /// User id (`sub`).
    pub user: Arc<str>,
    /// Granted permissions.
    pub perms: Perms,
}

/// Why a token was refused; the text goes to the client in CONNECT_ERROR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the auth payload, the Authorization header or the query.
    #[error("authentication required: no token in auth payload, Authorization header or ?token=")]
    Missing,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// Signature does not verify.
    #[error("invalid token signature")]
    BadSignature,
    /// The token names an algorithm other than the configured one.
    #[error("token algorithm not accepted")]
    Algorithm,
    /// A claim is missing or not the right type, or an id is empty or too long.
    #[error("invalid token claims: {0}")]
    Claims(String),
    /// Not a JWT at all.
    #[error("malformed token")]
    Malformed,
}

/// Checks tokens against the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    max_id_len: usize,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({:?})", self.validation.algorithms)
    }
}

/// A configured public key that cannot verify tokens.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("public key is neither an RSA (RS256) nor a P-256 (ES256) PEM key: {0}")]
pub struct KeyError(String);

impl Verifier {
    /// Verifies HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8], leeway_secs: u64, max_id_len: usize) -> Verifier {
        Verifier::with(DecodingKey::from_secret(secret), Algorithm::HS256, leeway_secs, max_id_len)
    }

    /// Verifies RS256 (RSA key) or ES256 (P-256 key) tokens with a PEM public key.
    pub fn public_key_pem(pem: &[u8], leeway_secs: u64, max_id_len: usize) -> Result<Verifier, KeyError> {
        if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Verifier::with(k, Algorithm::RS256, leeway_secs, max_id_len));
        }
        match DecodingKey::from_ec_pem(pem) {
            Ok(k) => Ok(Verifier::with(k, Algorithm::ES256, leeway_secs, max_id_len)),
            Err(e) => Err(KeyError(e.to_string())),
        }
    }

    fn with(key: DecodingKey, alg: Algorithm, leeway: u64, max_id_len: usize) -> Verifier {
        let mut validation = Validation::new(alg);
        validation.leeway = leeway;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        Verifier { key, validation, max_id_len }
    }

    /// The algorithm this verifier accepts.
    pub fn algorithm(&self) -> Algorithm {
        self.validation.algorithms[0]
    }

    /// Verifies `token` and returns the identity it grants.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        // The header names the algorithm; one outside jsonwebtoken's list (`none`) fails
        // to parse there, before any claim is read.
        if let Err(e) = jsonwebtoken::decode_header(token) {
            return Err(match e.kind() {
                ErrorKind::Json(j) if j.to_string().contains("unknown variant") => AuthError::Algorithm,
                _ => AuthError::Malformed,
            });
        }
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
            ErrorKind::MissingRequiredClaim(c) => AuthError::Claims(format!("missing {c}")),
            ErrorKind::Json(e) => AuthError::Claims(e.to_string()),
            _ => AuthError::Malformed,
        })?;
        let c = data.claims;
        for (name, v) in [("sub", &c.sub), ("tenantId", &c.tenant_id)] {
            if v.is_empty() || v.len() > self.max_id_len || v.contains('\x1f') {
                return Err(AuthError::Claims(format!("{name} must be 1..={} bytes", self.max_id_len)));
            }
        }
        Ok(Identity {
            tenant: c.tenant_id.into(),
            user: c.sub.into(),
            perms: c.permissions.as_deref().map(Perms::from_claim).unwrap_or(Perms::ALL),
        })
    }
}

/// Mints an HS256 token (development tokens, tests, the load generator).
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> String {
    // Encoding a plain struct with an HMAC key cannot fail.
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn claims(exp: u64) -> Claims {
        Claims { sub: "alice".into(), tenant_id: "t1".into(), permissions: None, exp }
    }

    #[test]
    fn accepts_valid_and_refuses_forged_expired_none() {
        let v = Verifier::hs256(b"secret", 0, 128);
        let id = v.verify(&mint_hs256(b"secret", &claims(now() + 60))).unwrap();
        assert_eq!((&*id.tenant, &*id.user, id.perms), ("t1", "alice", Perms::ALL));
        assert_eq!(v.verify(&mint_hs256(b"other", &claims(now() + 60))), Err(AuthError::BadSignature));
        assert_eq!(v.verify(&mint_hs256(b"secret", &claims(now() - 60))), Err(AuthError::Expired));
        // {"alg":"none","typ":"JWT"} . claims . empty signature
        let body = mint_hs256(b"secret", &claims(now() + 60));
        let payload = body.split('.').nth(1).unwrap();
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
        assert_eq!(v.verify(&none), Err(AuthError::Algorithm));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &claims(now() + 60),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(v.verify(&hs512), Err(AuthError::Algorithm));
        assert_eq!(v.verify("garbage"), Err(AuthError::Malformed));
    }

    #[test]
    fn permissions_claim_limits() {
        let p = Perms::from_claim(&["room:join".into(), "bogus".into()]);
        assert!(p.allows(Perms::JOIN));
        assert!(!p.allows(Perms::SEND));
        assert!(Perms::from_claim(&["*".into()]).allows(Perms::ALL));
    }
}
