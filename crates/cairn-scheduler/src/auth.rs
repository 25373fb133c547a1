//! Tokens: random, shown once, kept only as their SHA-256.

use sha2::{Digest, Sha256};

/// A new token: `cairn_` and 32 random bytes in hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("cairn_{}", hex::encode(bytes))
}

/// What the catalogue keeps of a token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
