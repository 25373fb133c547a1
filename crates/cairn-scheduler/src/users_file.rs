//! Log in from a local user file: people of the API and the dashboard with a name, a role and
//! an Argon2id password hash, in a TOML file the coordinator reads (`serve --users FILE`).
//!
//! ```toml
//! [users.alice]
//! role = "operator"                    # viewer, operator or admin
//! password-hash = "$argon2id$v=19$m=19456,t=2,p=1$..."   # cairn-coordinator hash-password
//! ```
//!
//! A login (`POST /api/v1/login`) checks the password and opens a session: a token kept hashed
//! by the catalogue, valid for [`SESSION_HOURS`] or until logout. The file is read again at
//! each login, so a user removed from it cannot log in again (sessions already open run out).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use serde::Deserialize;

use crate::{Error, Role};

/// How long a session lasts.
pub const SESSION_HOURS: i64 = 12;

/// The largest users file read.
const MAX_FILE: u64 = 1 << 20;

/// The most memory (KiB), passes and lanes a hash in the file may ask of a login: a hash is
/// recomputed at every login, and a file's must not exhaust the coordinator.
const MAX_M_KIB: u32 = 256 * 1024;
const MAX_T: u32 = 16;
const MAX_P: u32 = 8;

/// The users of a local user file, checked.
#[derive(Clone, Debug)]
pub struct UsersFile {
    path: PathBuf,
    users: BTreeMap<String, FileUser>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileUser {
    role: String,
    password_hash: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Layout {
    #[serde(default)]
    users: BTreeMap<String, FileUser>,
}

impl UsersFile {
    /// Reads and checks the file at `path`: each user's name, role and hash.
    pub fn load(path: &Path) -> Result<UsersFile, Error> {
        use std::io::Read;
        let bad = |message: String| Error::UsersFile { path: path.to_owned(), message };
        let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
        // Whoever may change the file may make themselves an admin.
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(bad(format!(
                "is owned by user {}, not by root or the coordinator's user: chown it",
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(bad("may be changed by other users: chmod 600 it".into()));
        }
        let mut text = String::new();
        file.take(MAX_FILE + 1).read_to_string(&mut text).map_err(|e| bad(e.to_string()))?;
        if text.len() as u64 > MAX_FILE {
            return Err(bad("is larger than 1 MiB".into()));
        }
        UsersFile::parse(&text, path)
    }

    /// Parses and checks `text`, read from `path` (named in messages).
    pub fn parse(text: &str, path: &Path) -> Result<UsersFile, Error> {
        let bad = |message: String| Error::UsersFile { path: path.to_owned(), message };
        let layout: Layout = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        for (name, user) in &layout.users {
            if name.parse::<cairn_format::Name>().is_err() {
                return Err(bad(format!(
                    "[users.{name:?}]: a user name is 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
            user.role.parse::<Role>().map_err(|e| bad(format!("[users.{name}] role: {e}")))?;
            check_hash(&user.password_hash)
                .map_err(|e| bad(format!("[users.{name}] password-hash: {e}")))?;
        }
        Ok(UsersFile { path: path.to_owned(), users: layout.users })
    }

    /// The file read again (a login sees its latest users).
    pub fn reload(&self) -> Result<UsersFile, Error> {
        UsersFile::load(&self.path)
    }

    /// The role of `name` if `password` is theirs. An unknown name costs a hash as well, so
    /// that timing does not tell which names exist.
    pub fn check(&self, name: &str, password: &str) -> Option<Role> {
        match self.users.get(name) {
            Some(user) => Argon2::default()
                .verify_password(password.as_bytes(), user.password_hash.as_str())
                .ok()
                .and_then(|()| user.role.parse().ok()),
            None => {
                let _ = Argon2::default().verify_password(password.as_bytes(), DUMMY_HASH);
                None
            }
        }
    }

    /// The role `name` has now (none: not listed).
    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.users.get(name).and_then(|u| u.role.parse().ok())
    }

    /// How many users it lists.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True if it lists none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// The hash checked for unknown names (of a random password nobody has).
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$Y2Fpcm4tZHVtbXktc2FsdA$pQmBoaHkQHB0cGmE1H0zyJvwfbo0XPzS5kVQxsaz0sY";

/// Why `hash` is not a usable Argon2id PHC string within the cost limits, if so.
fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC string ({e})"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "{} is not argon2id: make it with `cairn-coordinator hash-password`",
            parsed.algorithm
        ));
    }
    let params = argon2::Params::try_from(&parsed).map_err(|e| format!("its parameters: {e}"))?;
    if params.m_cost() > MAX_M_KIB || params.t_cost() > MAX_T || params.p_cost() > MAX_P {
        return Err(format!(
            "asks too much of every login (m at most {MAX_M_KIB} KiB, t {MAX_T}, p {MAX_P})"
        ));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("has no salt or no hash".into());
    }
    Ok(())
}

/// The Argon2id hash of `password` for a users file (a random salt; default costs).
pub fn hash_password(password: &str) -> Result<String, Error> {
    if password.is_empty() {
        return Err(Error::Refused("an empty password is not a password".into()));
    }
    let salt: [u8; 16] = rand::random();
    Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Refused(format!("hashing the password: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("users.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_good_password_gives_the_role_and_a_bad_one_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let text = format!("[users.alice]\nrole = \"operator\"\npassword-hash = {hash:?}\n");
        let users = UsersFile::load(&write(&dir, &text)).unwrap();
        assert_eq!(users.check("alice", "correct horse"), Some(Role::Operator));
        assert_eq!(users.check("alice", "Correct horse"), None);
        assert_eq!(users.check("bob", "correct horse"), None);
        assert!(check_hash(DUMMY_HASH).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_parsed_or_refused(text in ".{0,300}", name in "[a-z]{1,8}") {
            let _ = UsersFile::parse(&text, Path::new("users.toml"));
            let entry = format!("[users.{name}]\nrole = \"viewer\"\npassword-hash = {text:?}\n");
            let _ = UsersFile::parse(&entry, Path::new("users.toml"));
        }
    }

    #[test]
    fn a_file_others_may_change_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = UsersFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(UsersFile::load(&path).unwrap().is_empty());
    }

    #[test]
    fn each_bad_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let hash = hash_password("pw").unwrap();
        let good = format!("[users.alice]\nrole = \"operator\"\npassword-hash = {hash:?}\n");
        let costly = hash.replace("m=19456", "m=4000000");
        let cases = [
            (good.replace("operator", "root"), "role"),
            (good.replace("[users.alice]", "[users.\"a b\"]"), "user name"),
            (good.replace("password-hash", "password"), "unknown field"),
            (good.replace(&hash, "plain"), "not a PHC string"),
            (good.replace("argon2id", "argon2i"), "not argon2id"),
            (good.replace(&hash, &costly), "asks too much"),
        ];
        for (text, says) in cases {
            let e = UsersFile::load(&write(&dir, &text)).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("users.toml"), "{says}: {e}");
        }
        assert!(hash_password("").is_err());
    }
}
