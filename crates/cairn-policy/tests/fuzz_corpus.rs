//! Replays the committed fuzz corpus of the `retention` target, `fuzz/corpus/retention/`,
//! through the body that target runs (`fuzz/bodies/policy.rs`), on stable.

#[path = "../../../fuzz/bodies/policy.rs"]
mod bodies;

#[test]
fn retention() {
    cairn_testkit::replay_corpus("retention", bodies::retention);
}
