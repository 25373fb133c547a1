//! Replays the committed fuzz corpora of the `retention` and `policy` targets (`fuzz/corpus/`),
//! through the body that target runs (`fuzz/bodies/policy.rs`), on stable.

#[path = "../../../fuzz/bodies/policy.rs"]
mod bodies;

#[test]
fn retention() {
    cairn_testkit::replay_corpus("retention", bodies::retention);
}

#[test]
fn policy() {
    cairn_testkit::replay_corpus("policy", bodies::policy);
}
