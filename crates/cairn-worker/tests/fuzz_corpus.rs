//! Replays the committed fuzz corpora of the `agent_protocol` and `agent_config` targets
//! (`fuzz/corpus/`), through the bodies those targets run (`fuzz/bodies/protocol.rs`), on
//! stable.

#[path = "../../../fuzz/bodies/protocol.rs"]
mod bodies;

#[test]
fn agent_protocol() {
    cairn_testkit::replay_corpus("agent_protocol", bodies::agent_protocol);
}

#[test]
fn agent_config() {
    cairn_testkit::replay_corpus("agent_config", bodies::agent_config);
}
