//! `sandbox template create|list|delete`: the VM templates of a configuration's store
//! ([`crate::template`]).

use std::path::PathBuf;

use anyhow::Result;

use crate::config;
use crate::net;
use crate::template::{self, Inputs, Listed};

/// What `sandbox template` was asked.
#[derive(Debug, Clone)]
pub enum Request {
    /// Make the configuration's template unless it exists.
    Create {
        /// Configuration file.
        config: PathBuf,
        /// Parent of the template VM's run directory.
        run_root: PathBuf,
    },
    /// List the store.
    List {
        /// Configuration file.
        config: PathBuf,
    },
    /// Delete one template, or all (`digest` `None`).
    Delete {
        /// Configuration file.
        config: PathBuf,
        /// The template's digest.
        digest: Option<String>,
    },
}

/// Runs `request`, printing what it did.
pub async fn run(log: &slog::Logger, request: Request) -> Result<()> {
    match request {
        Request::Create { config, run_root } => {
            let cfg = config::load(&config)?;
            let t = template::ensure(log, &cfg, &run_root).await?;
            println!(
                "template {} ready in {} (boot {} ms, save {} ms)",
                t.digest,
                t.dir.display(),
                t.meta.boot_ms,
                t.meta.save_ms
            );
        }
        Request::List { config } => {
            let cfg = config::load(&config)?;
            let (kind, hc) = (cfg.backend, cfg.hypervisor.clone());
            let current = net::blocking(move || Inputs::of(kind, &hc))
                .await??
                .digest();
            let store = &cfg.factory.template_path;
            let listed = template::list(store)?;
            if listed.is_empty() {
                println!("no template in {}", store.display());
            }
            for entry in listed {
                match entry {
                    Listed::Complete(t) => {
                        let state = if t.digest == current {
                            "current"
                        } else {
                            "stale (another VMM, kernel or configuration)"
                        };
                        let inputs = &t.meta.inputs.0;
                        println!(
                            "{}  {state}  {} vCPU {} MiB {}  {}",
                            t.digest,
                            inputs.get("vcpus").map_or("?", String::as_str),
                            inputs.get("memory_mib").map_or("?", String::as_str),
                            t.meta.vmm_version,
                            t.dir.display()
                        );
                    }
                    Listed::Incomplete(dir) => {
                        println!(
                            "-  incomplete (being made, or left by a creator that died)  {}",
                            dir.display()
                        );
                    }
                }
            }
        }
        Request::Delete { config, digest } => {
            let cfg = config::load(&config)?;
            for dir in template::delete(&cfg.factory.template_path, digest.as_deref())? {
                println!("removed {}", dir.display());
            }
        }
    }
    Ok(())
}
