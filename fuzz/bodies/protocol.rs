//! Fuzz bodies for the coordinator–agent contract: what each side decodes from the other, and
//! the agent's own configuration file.

/// Bytes from the network (or the agent's state folder, which keeps the same types): every
/// message type decodes or is refused without panicking, and a decoded one encodes back to
/// the same value.
pub fn agent_protocol(data: &[u8]) {
    fn round_trip<T>(data: &[u8]) -> Option<T>
    where
        T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
    {
        let value: T = serde_json::from_slice(data).ok()?;
        let again: T = serde_json::from_slice(&serde_json::to_vec(&value).expect("encodes"))
            .expect("what was encoded decodes");
        assert_eq!(value, again);
        Some(value)
    }
    if let Some(orders) = round_trip::<cairn_protocol::Orders>(data) {
        // The agent parses the cached policies while the coordinator is away.
        for entry in &orders.schedule {
            let _ = cairn_policy::Policy::parse(&entry.spec);
        }
    }
    for order in orders_of(data) {
        // A restore order the agent accepts names a folder and a disk that are plain names.
        if order.problem().is_none() {
            assert!(!order.to.contains('/') && !order.to.starts_with('.'));
            assert!(order.disk.as_deref().is_none_or(|d| !d.contains('/') && !d.starts_with('.')));
        }
    }
    round_trip::<cairn_protocol::Report>(data);
    round_trip::<cairn_protocol::OfflineRun>(data);
    round_trip::<cairn_protocol::Poll>(data);
    round_trip::<cairn_protocol::Enrolled>(data);
}

/// The restore orders in `data`, alone or in a poll's jobs.
fn orders_of(data: &[u8]) -> Vec<cairn_protocol::RestoreOrder> {
    let mut found: Vec<_> =
        serde_json::from_slice::<cairn_protocol::RestoreOrder>(data).ok().into_iter().collect();
    if let Ok(orders) = serde_json::from_slice::<cairn_protocol::Orders>(data) {
        found.extend(orders.jobs.into_iter().filter_map(|j| j.restore));
    }
    found
}

/// The agent's configuration file: parsing and checking never panic.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = cairn_worker::AgentConfig::parse(text, std::path::Path::new("agent.toml")) {
        assert!(config.state_dir.is_absolute());
        assert!((1..=64).contains(&config.max_jobs));
    }
}
