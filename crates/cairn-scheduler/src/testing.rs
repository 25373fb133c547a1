//! Fixtures the unit tests of several modules share.

use jiff::Timestamp;

use crate::{Catalogue, VmRecord};

/// A daily policy at 02:00 keeping 7 days.
pub const DAILY: &str = "name = \"daily\"\n[schedule]\nkind = \"daily\"\ntimes = [\"02:00\"]\n[retention]\nkeep-daily = 7\n";

/// What a current agent says it runs besides backups.
pub fn restores() -> Vec<String> {
    vec!["restore".into()]
}

/// A time from its RFC 3339 text.
pub fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// A catalogue in `dir` with [`DAILY`] and `vms` (name, protected) on host kvm-1, in `vault`.
pub fn catalogue(dir: &tempfile::TempDir, vms: &[(&str, bool)], vault: &str) -> Catalogue {
    let mut c = Catalogue::open(&dir.path().join("c.db")).unwrap();
    c.put_policy(DAILY, at("2026-06-01T00:00:00Z")).unwrap();
    for (name, protected) in vms {
        let vm = VmRecord {
            name: (*name).into(),
            host: "kvm-1".into(),
            datastore: "ds".into(),
            vault: vault.into(),
            policy: Some("daily".into()),
            protected: *protected,
            planned_until: at("2026-06-01T00:00:00Z"),
        };
        c.protect(&vm, at("2026-06-01T00:00:00Z")).unwrap();
    }
    c
}
