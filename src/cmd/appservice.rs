//! `msgnode appservice registration`: the file a homeserver needs to know msgnode.

use std::process::ExitCode;

use crate::cli::AppserviceCommand;
use crate::config::Config;
use crate::matrix::registration::{self, RegistrationSpec};

/// Runs one `appservice` verb; flags not given come from `config` (`[pep] server_name`, the
/// URL of `[pep] listen`).
///
/// # Errors
/// The file exists (without `--force`) or cannot be written.
pub fn run(command: AppserviceCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        AppserviceCommand::Registration(args) => {
            let spec = RegistrationSpec {
                id: args.id,
                url: args
                    .url
                    .unwrap_or_else(|| format!("http://{}", config.pep.listen)),
                prefix: args.prefix,
                server_name: args
                    .server_name
                    .unwrap_or_else(|| config.pep.server_name.clone()),
                ..RegistrationSpec::default()
            };
            let generated = registration::generate(&spec);
            match args.output {
                Some(path) => {
                    registration::write(&generated, &path, args.force)?;
                    eprintln!(
                        "wrote {} (add it to the homeserver's app_service_config_files)",
                        path.display()
                    );
                }
                None => print!("{}", yaml_serde::to_string(&generated)?),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
