//! `cairn-agent config check`: everything a backup would refuse, found before it runs.

use std::path::Path;

use cairn_snapshot::VmConfig;
use serde_json::json;

use crate::output::{Exit, print_json};

pub fn check(file: &Path, json: bool) -> anyhow::Result<Exit> {
    let config = VmConfig::load(file)?;
    let options = super::backup::job_options(None, None)?;
    let checks = cairn_backup::check(&config, &options);
    let valid = checks.iter().all(|c| c.result.is_ok());
    if json {
        let items: Vec<_> = checks
            .iter()
            .map(|c| match &c.result {
                Ok(detail) => json!({ "check": c.what, "ok": true, "detail": detail }),
                Err(problem) => json!({ "check": c.what, "ok": false, "problem": problem }),
            })
            .collect();
        print_json(&json!({ "config": file, "valid": valid, "checks": items }));
    } else {
        for c in &checks {
            match &c.result {
                Ok(detail) => println!("ok       {}: {detail}", c.what),
                Err(problem) => println!("PROBLEM  {}: {problem}", c.what),
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
