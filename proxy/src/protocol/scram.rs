//! SCRAM-SHA-256 (RFC 5802, RFC 7677) on the server side, for the admin console's
//! login and pooled clients', and the client side with the keys a client's proof
//! revealed (SCRAM passthrough for pooled server connections): the verifier in PostgreSQL's format
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as in `pg_authid`) and
//! the exchange as a state machine over message contents, with no I/O.
//!
//! Only `SCRAM-SHA-256` is offered, never `-PLUS`: a client that could bind to the TLS
//! channel says so with the `y` flag, which is accepted because the server offered no
//! binding. The password itself is never kept, only the verifier (a password in the
//! config is turned into one at load, with a random salt).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Bytes of server nonce added to the client's.
const NONCE_BYTES: usize = 18;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client's message does not follow the protocol.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The proof does not match the verifier: wrong password.
    #[error("password authentication failed")]
    WrongPassword,
}

/// What the server stores: never the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(SCRAM-SHA-256, redacted)")
    }
}

impl Verifier {
    /// Parses PostgreSQL's verifier format.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok().filter(|i| *i > 0)?;
        let salt = BASE64.decode(salt).ok().filter(|s| !s.is_empty())?;
        let stored_key = BASE64.decode(stored).ok()?.try_into().ok()?;
        let server_key = BASE64.decode(server).ok()?.try_into().ok()?;
        Some(Self {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// A verifier for `password` with a random salt and 4096 iterations (PostgreSQL's
    /// default), SASLprep-normalised like PostgreSQL's.
    pub fn from_password(password: &str) -> Self {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        // postgres-protocol writes exactly the format parsed above.
        Self::parse(&text).unwrap_or_else(Self::unusable)
    }

    /// The verifier an unknown role is challenged with, as PostgreSQL's mock: a salt
    /// that is the same for every attempt at `user` (derived from `secret`, which the
    /// process chose at random), so repeated attempts cannot tell a missing role from
    /// an existing one, and keys no proof matches. Costs no key derivation, so an
    /// unknown role costs what a known one does.
    pub fn mock(user: &str, secret: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(secret)
            .chain_update(user.as_bytes())
            .finalize();
        Self {
            salt: digest[..16].to_vec(),
            ..Self::unusable()
        }
    }

    /// A verifier no proof matches (keys of all zeroes have no SHA-256 preimage known).
    fn unusable() -> Self {
        Self {
            iterations: 4096,
            salt: vec![0; 16],
            stored_key: [0; 32],
            server_key: [0; 32],
        }
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

/// An exchange after the server-first message: waiting for the client's proof.
pub struct Exchange<'a> {
    verifier: &'a Verifier,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> Exchange<'a> {
    /// Reads client-first-message (`n,,n=,r=<nonce>`) and returns the exchange with the
    /// server-first-message to send.
    pub fn start(
        verifier: &'a Verifier,
        client_first: &[u8],
    ) -> Result<(Self, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            _ if flag.starts_with("p=") => {
                return Err(ScramError::Malformed("channel binding was not offered"));
            }
            _ => return Err(ScramError::Malformed("bad GS2 flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("no GS2 header"))?;
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(ScramError::Malformed("bad authorization identity"));
        }
        if bare.starts_with("m=") {
            return Err(ScramError::Malformed(
                "mandatory extensions are not supported",
            ));
        }
        let client_nonce = attribute(bare, 'r').ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .chars()
                .all(|c| c.is_ascii_graphic() && c != ',')
        {
            return Err(ScramError::Malformed("bad client nonce"));
        }
        let server_nonce: [u8; NONCE_BYTES] = rand::random();
        let nonce = format!("{client_nonce}{}", BASE64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = Self {
            verifier,
            gs2_header: format!("{flag},{authzid},"),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Checks client-final-message (`c=…,r=…,p=<proof>`); returns the
    /// server-final-message (`v=<signature>`) when the proof matches.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        self.finish_with_keys(client_final)
            .map(|(server_final, _)| server_final)
    }

    /// [`Exchange::finish`], also returning the keys the client's proof revealed (its
    /// ClientKey, which hashes to the verifier's StoredKey): with them spillway can
    /// log in to PostgreSQL as that client where PostgreSQL holds the same verifier
    /// (SCRAM passthrough, as PgBouncer 1.22+ does), without ever knowing the password.
    pub fn finish_with_keys(self, client_final: &[u8]) -> Result<(String, ScramKeys), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let binding =
            attribute(without_proof, 'c').ok_or(ScramError::Malformed("no channel binding"))?;
        if BASE64.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed(
                "channel binding does not match the GS2 header",
            ));
        }
        if attribute(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("bad proof"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(client_signature.iter()))
        {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((
            format!("v={}", BASE64.encode(server_signature)),
            ScramKeys {
                client_key,
                server_key: self.verifier.server_key,
            },
        ))
    }
}

/// What a successful exchange revealed: enough to log in as the client where the same
/// verifier is stored. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(redacted)")
    }
}

/// The client side of SCRAM-SHA-256 with [`ScramKeys`] instead of a password.
pub struct ClientExchange {
    keys: ScramKeys,
    client_first_bare: String,
    /// The server signature expected in server-final, once client-final is sent.
    expected: Option<[u8; 32]>,
}

impl ClientExchange {
    /// The exchange and its client-first-message (`n,,n=,r=<nonce>`).
    pub fn start(keys: ScramKeys) -> (Self, String) {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let client_first_bare = format!("n=,r={}", BASE64.encode(nonce));
        let first = format!("n,,{client_first_bare}");
        (
            Self {
                keys,
                client_first_bare,
                expected: None,
            },
            first,
        )
    }

    /// Answers server-first (`r=…,s=…,i=…`) with client-final (`c=biws,r=…,p=…`).
    pub fn update(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = attribute(text, 'r').ok_or(ScramError::Malformed("no server nonce"))?;
        let ours = attribute(&self.client_first_bare, 'r').unwrap_or_default();
        if !nonce.starts_with(ours) || nonce.len() <= ours.len() {
            return Err(ScramError::Malformed("server nonce does not extend ours"));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; 32];
        for (p, (k, s)) in proof
            .iter_mut()
            .zip(self.keys.client_key.iter().zip(signature.iter()))
        {
            *p = k ^ s;
        }
        self.expected = Some(hmac(&self.keys.server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks server-final (`v=<signature>`): the server holds the same verifier.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let signature: [u8; 32] = attribute(text, 'v')
            .and_then(|v| BASE64.decode(v).ok())
            .and_then(|v| v.try_into().ok())
            .ok_or(ScramError::Malformed("no server signature"))?;
        match &self.expected {
            Some(expected) if constant_time_eq(expected, &signature) => Ok(()),
            _ => Err(ScramError::WrongPassword),
        }
    }
}

/// The value of `<name>=` among the comma-separated attributes of a SCRAM message.
fn attribute(message: &str, name: char) -> Option<&str> {
    message.split(',').find_map(|a| {
        let mut chars = a.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &a[2..])
    })
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().into()
        }
        Err(_) => [0; 32],
    }
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// A whole exchange against postgres-protocol's client (the one tokio-postgres
    /// uses); `Ok` when the client accepted the server's signature too.
    fn login(verifier: &Verifier, password: &str) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = Exchange::start(verifier, client.message())?;
        client
            .update(server_first.as_bytes())
            .map_err(|_| ScramError::Malformed("client refused server-first"))?;
        let server_final = exchange.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::Malformed("client refused the server signature"))
    }

    #[test]
    fn right_password_logs_in_and_the_server_is_verified() {
        let v = Verifier::from_password("s3cret");
        assert_eq!(login(&v, "s3cret"), Ok(()));
    }

    #[test]
    fn keys_from_a_login_log_in_again_without_the_password() {
        let v = Verifier::from_password("s3cret");
        let keys = keys_for(&v, "s3cret");
        // spillway as the client, against a server holding the same verifier.
        let (mut ours, first) = ClientExchange::start(keys);
        let (server, server_first) = Exchange::start(&v, first.as_bytes()).expect("works");
        let client_final = ours.update(server_first.as_bytes()).expect("works");
        let server_final = server.finish(client_final.as_bytes()).expect("works");
        assert_eq!(ours.finish(server_final.as_bytes()), Ok(()));
        assert!(ours.finish(b"v=AAAA").is_err());
        // Another verifier for the same password (another salt) does not accept them.
        let other = Verifier::from_password("s3cret");
        let (mut ours, first) = ClientExchange::start(keys_for(&v, "s3cret"));
        let (server, server_first) = Exchange::start(&other, first.as_bytes()).expect("works");
        let client_final = ours.update(server_first.as_bytes()).expect("works");
        assert_eq!(
            server.finish(client_final.as_bytes()),
            Err(ScramError::WrongPassword)
        );
    }

    /// The keys a login with `password` against `v` reveals.
    fn keys_for(v: &Verifier, password: &str) -> ScramKeys {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let (exchange, server_first) = Exchange::start(v, client.message()).expect("works");
        client.update(server_first.as_bytes()).expect("works");
        exchange
            .finish_with_keys(client.message())
            .expect("works")
            .1
    }

    #[test]
    fn a_mock_verifier_refuses_every_password_with_a_salt_fixed_per_role() {
        let secret = [7u8; 32];
        let v = Verifier::mock("nobody", &secret);
        for guess in ["", "nobody", "s3cret"] {
            assert_eq!(login(&v, guess), Err(ScramError::WrongPassword));
        }
        // The same role always sees the same salt (as a stored verifier's), another
        // role or another process's secret another one.
        assert_eq!(v, Verifier::mock("nobody", &secret));
        assert_ne!(v.salt, Verifier::mock("somebody", &secret).salt);
        assert_ne!(v.salt, Verifier::mock("nobody", &[8u8; 32]).salt);
        assert_eq!(v.iterations, 4096);
    }

    #[test]
    fn wrong_password_is_refused() {
        let v = Verifier::from_password("s3cret");
        assert_eq!(login(&v, "guess"), Err(ScramError::WrongPassword));
    }

    #[test]
    fn verifier_round_trips_and_redacts() {
        let v = Verifier::from_password("pw");
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:"), "{text}");
        assert_eq!(Verifier::parse(&text), Some(v.clone()));
        assert!(!format!("{v:?}").contains("4096"));
        assert_eq!(
            login(&Verifier::parse(&text).expect("parses"), "pw"),
            Ok(())
        );
    }

    #[test]
    fn verifier_in_pg_authid_shape_parses() {
        // The shape of pg_authid.rolpassword; the integration test logs in with a
        // verifier PostgreSQL itself made.
        let v = Verifier::parse(
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
             WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
             HKLpL2bVc/r/r9k8iNW1Ulkw7YnlGtbuGCCvo2bGx6E=",
        );
        assert!(v.is_some());
    }

    #[test]
    fn malformed_messages_are_refused() {
        let v = Verifier::from_password("pw");
        for first in [
            &b"p=tls-server-end-point,,n=,r=abc"[..],
            b"x,,n=,r=abc",
            b"n,,n=",
            b"n,,m=ext,n=,r=a",
        ] {
            assert!(
                matches!(Exchange::start(&v, first), Err(ScramError::Malformed(_))),
                "{first:?}"
            );
        }
        let (exchange, _) = Exchange::start(&v, b"n,,n=,r=abc").expect("starts");
        assert!(matches!(
            exchange.finish(b"c=biws,r=wrongnonce,p=AAAA"),
            Err(ScramError::Malformed(_))
        ));
        assert!(Verifier::parse("md5abc").is_none());
        assert!(Verifier::parse("SCRAM-SHA-256$0:AAAA$AA==:AA==").is_none());
    }
}
