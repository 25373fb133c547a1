//! Where the agent gets a vault's key: `--key-file`, `--passphrase-file`, the
//! `CAIRN_PASSPHRASE` variable, or (on a terminal only) a prompt. Key files the agent makes
//! hold 32 random bytes as 64 hex digits; recovery keys are the same, printed in groups.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, bail};
use cairn_vault::Credential;
use rand::RngExt;
use zeroize::Zeroizing;

/// The variable that may hold a passphrase (as restic's RESTIC_PASSWORD).
pub const PASSPHRASE_VAR: &str = "CAIRN_PASSPHRASE";

/// The passphrase `CAIRN_PASSPHRASE` held when the agent started.
static ENV_PASSPHRASE: std::sync::OnceLock<Option<Zeroizing<Vec<u8>>>> = std::sync::OnceLock::new();

/// Reads `CAIRN_PASSPHRASE` and removes it from the environment. Call it first thing in
/// `main`, while the process has one thread.
pub fn take_passphrase_from_env() {
    let value = std::env::var_os(PASSPHRASE_VAR).map(|v| {
        use std::os::unix::ffi::OsStringExt;
        Zeroizing::new(v.into_vec())
    });
    if value.is_some() {
        // SAFETY: called at the start of main, before any other thread exists, so nothing
        // reads the environment while it changes.
        #[allow(unsafe_code)]
        unsafe {
            std::env::remove_var(PASSPHRASE_VAR);
        }
    }
    let _ = ENV_PASSPHRASE.set(value);
}

/// The credential given by flags or the environment, if any (never a prompt).
pub fn given(
    key_file: Option<&Path>,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<Option<Credential>> {
    if let Some(credential) = Credential::from_files(key_file, passphrase_file)? {
        return Ok(Some(credential));
    }
    let from_env = match ENV_PASSPHRASE.get() {
        Some(value) => value.clone(),
        // Not taken at start: read it as it is.
        None => std::env::var_os(PASSPHRASE_VAR).map(|v| {
            use std::os::unix::ffi::OsStringExt;
            Zeroizing::new(v.into_vec())
        }),
    };
    Ok(from_env.map(Credential::Passphrase))
}

/// Asks for the passphrase of `url` on the terminal; `None` when stdin is not a terminal.
pub fn prompt(url: &str) -> anyhow::Result<Option<Credential>> {
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let pass = rpassword::prompt_password(format!("passphrase for vault {url}: "))
        .context("reading the passphrase")?;
    Ok(Some(Credential::Passphrase(Zeroizing::new(pass.into_bytes()))))
}

/// Asks for a new passphrase twice on the terminal; `None` when stdin is not a terminal.
pub fn prompt_new(what: &str) -> anyhow::Result<Option<Credential>> {
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let first = Zeroizing::new(rpassword::prompt_password(format!("new passphrase for {what}: "))?);
    let second = Zeroizing::new(rpassword::prompt_password("the same passphrase again: ")?);
    if first != second {
        bail!("the two passphrases differ; nothing was changed");
    }
    Ok(Some(Credential::Passphrase(Zeroizing::new(first.as_bytes().to_vec()))))
}

/// 32 random bytes as 64 lowercase hex digits.
fn random_hex_key() -> Zeroizing<String> {
    let bytes: [u8; 32] = rand::rng().random();
    Zeroizing::new(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a new key file at `path` (mode 600, never over an existing file) and returns its
/// credential.
pub fn create_key_file(path: &Path) -> anyhow::Result<Credential> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = random_hex_key();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    file.write_all(format!("{}\n", key.as_str()).as_bytes())?;
    file.sync_all()?;
    Ok(Credential::KeyFile(Zeroizing::new(key.as_bytes().to_vec())))
}

/// A new recovery key: its credential, and the text to print (16 groups of 4 hex digits).
pub fn new_recovery_key() -> (Credential, Zeroizing<String>) {
    let key = random_hex_key();
    let groups: Vec<&str> =
        (0..16).map(|i| key.get(i * 4..i * 4 + 4).unwrap_or_default()).collect();
    let printed = Zeroizing::new(groups.join("-"));
    (Credential::KeyFile(Zeroizing::new(key.as_bytes().to_vec())), printed)
}
