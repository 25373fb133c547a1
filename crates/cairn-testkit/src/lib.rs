//! Helpers shared by the test suites of several Cairn crates. Only what more than one crate's
//! tests need lives here; a crate's own helpers stay in its `tests/`.

/// True when the test runs as root and may go on. As non-root it prints
/// "skipped: needs root" and returns false, unless `CAIRN_REQUIRE_ROOT_TESTS` is set (as
/// `scripts/test.sh` does when run as root), where a skip would hide a test: then it panics.
pub fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CAIRN_REQUIRE_ROOT_TESTS").is_none(),
        "CAIRN_REQUIRE_ROOT_TESTS is set but the tests do not run as root"
    );
    eprintln!("skipped: needs root");
    false
}
