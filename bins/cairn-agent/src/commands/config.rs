//! `cairn-agent config check`: everything a backup would refuse, found before it runs.

use std::path::Path;

use cairn_snapshot::scripts::ScriptConfig;
use cairn_snapshot::{VmConfig, VmState};
use serde_json::json;

use crate::output::{Exit, print_json};

pub fn check(file: &Path, json: bool) -> anyhow::Result<Exit> {
    let config = VmConfig::load(file)?;
    let mut checks: Vec<(String, Result<String, String>)> = Vec::new();
    let state = match config.state {
        VmState::Running => "running",
        VmState::Stopped => "stopped",
    };
    checks.push(("vm".into(), Ok(format!("{} ({state})", config.vm))));
    for d in &config.disks {
        let what = format!("disk {} (view {:?})", d.spec.name, d.view);
        let result = cairn_snapshot::views::preflight(d.view, &d.spec).map_err(|e| e.to_string());
        checks.push((what, result));
    }
    if config.state == VmState::Stopped {
        for d in &config.disks {
            let result = cairn_snapshot::views::check_not_in_use(&d.spec)
                .map(|()| {
                    "not open for writing by any process the agent can see, nor by a loop device"
                        .to_string()
                })
                .map_err(|e| e.to_string());
            checks.push((format!("disk {} (VM stopped)", d.spec.name), result));
        }
    }
    if config.state == VmState::Running {
        if let Some(scripts) = &config.scripts {
            let result = ScriptConfig::load(scripts).map(|s| {
                format!(
                    "pre {}, post {}, timeout {} s, continueBackupOnFailure {}, fsFreezeEnabled {}",
                    s.pre_script.display(),
                    s.post_script.display(),
                    s.timeout_seconds,
                    s.continue_on_failure,
                    s.fs_freeze
                )
            });
            checks.push((
                format!("scripts {}", scripts.display()),
                result.map_err(|e| e.to_string()),
            ));
        }
        if !config.freeze_mounts.is_empty() {
            // The vault is not known here; `backup` checks it as well.
            let protected = super::snapshot::protected(&config, None);
            let result = super::snapshot::quiescer(&config, &protected)
                .map(|_| {
                    format!(
                        "{} (watchdog thaws after {} s)",
                        config
                            .freeze_mounts
                            .iter()
                            .map(|m| m.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                        config.watchdog_deadline.as_secs()
                    )
                })
                .map_err(|e| format!("{e:#}"));
            checks.push(("freeze".into(), result));
        }
    }
    let valid = checks.iter().all(|(_, r)| r.is_ok());
    if json {
        let items: Vec<_> = checks
            .iter()
            .map(|(what, r)| match r {
                Ok(detail) => json!({ "check": what, "ok": true, "detail": detail }),
                Err(problem) => json!({ "check": what, "ok": false, "problem": problem }),
            })
            .collect();
        print_json(&json!({ "config": file, "valid": valid, "checks": items }));
    } else {
        for (what, r) in &checks {
            match r {
                Ok(detail) => println!("ok       {what}: {detail}"),
                Err(problem) => println!("PROBLEM  {what}: {problem}"),
            }
        }
        if valid {
            println!("configuration is valid");
        } else {
            println!("{} has problems: fix them, then check again", file.display());
        }
    }
    Ok(if valid { Exit::Ok } else { Exit::Failed })
}
