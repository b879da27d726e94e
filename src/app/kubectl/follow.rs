//! Following one migration until it ends: its phases as they finish, its latest progress
//! line, and a bar while it transfers (on a terminal).

use std::time::{Duration, Instant};

use kube::Api;

use super::bars::Bars;
use crate::{
    api::{Mode, Phase, PodMigration},
    plugin::{self, PluginError},
};

/// Print every phase the migration goes through (from its recorded timings, so fast phases
/// are not missed between two polls) and the latest progress, until it ends.
pub async fn follow(pms: &Api<PodMigration>, name: &str, timeout: u64) -> Result<(), PluginError> {
    let started = Instant::now();
    let mut last = String::new();
    let mut phases_shown = 0;
    let mut bars = Bars::new();
    loop {
        if let Some(mut pm) = pms.get_opt(name).await? {
            let status = pm.status.clone().unwrap_or_default();
            for timing in status.phases.iter().skip(phases_shown) {
                bars.println(&plugin::phase_line(timing, started.elapsed().as_secs_f64()));
            }
            phases_shown = status.phases.len();
            let transfer = status.transfer.as_ref().filter(|_| status.phase == Phase::Transferring);
            if bars.transfer(name, transfer) {
                // The bar shows the transfer; the line keeps the phase and message only.
                if let Some(s) = pm.status.as_mut() {
                    s.transfer = None;
                }
            }
            let line = plugin::progress_line(&pm, started.elapsed().as_secs_f64());
            let key = line.split_once(']').map_or(line.as_str(), |(_, rest)| rest).to_string();
            if key != last && !status.phase.is_terminal() {
                bars.println(&line);
            }
            last = key;
            if status.phase.is_terminal() {
                bars.clear();
            }
            match status.phase {
                Phase::Succeeded if pm.spec.mode == Mode::Checkpoint => {
                    println!(
                        "stored: checkpoint {name} on {}; restore it with: kubectl migrate restore {name} [--to NODE] [--name NEW]",
                        pm.target_node().unwrap_or("?")
                    );
                    return Ok(());
                }
                Phase::Succeeded if pm.spec.mode == Mode::Restore => {
                    let pod = status.replacement.map(|r| r.name).unwrap_or_default();
                    println!("restored: {pod} runs on {}", pm.target_node().unwrap_or("?"));
                    return Ok(());
                }
                Phase::Succeeded => {
                    let replacement = status.replacement.map(|r| r.name).unwrap_or_default();
                    println!(
                        "migrated: {replacement} runs on {} (downtime {:.2} s)",
                        pm.target_node().unwrap_or("?"),
                        status.downtime_seconds.unwrap_or_default()
                    );
                    return Ok(());
                }
                Phase::Failed => {
                    return Err(PluginError::Failed {
                        name: name.to_string(),
                        reason: status.reason.unwrap_or_default(),
                        message: status.message.unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
        if started.elapsed() > Duration::from_secs(timeout) {
            return Err(PluginError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
