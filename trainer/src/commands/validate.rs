//! `dinoflow-trainer validate`: prints the config resolved (preset and defaults applied), or
//! fails naming the file and the YAML path at fault.
use std::path::Path;

use super::CommandError;

pub(super) fn run(config: &Path) -> Result<i32, CommandError> {
    let resolved = dinoflow_api::load::load_training_config(config).map_err(|source| {
        CommandError::Validate {
            config: config.to_path_buf(),
            source,
        }
    })?;
    print!("{}", dinoflow_api::load::render_yaml(&resolved));
    Ok(0)
}
