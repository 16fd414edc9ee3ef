//! Errors of the data pipeline.

use std::path::PathBuf;

/// Everything that can go wrong while reading or augmenting data.
///
/// [`DataError::is_permanent`] separates configuration/data problems that a restart cannot fix
/// (the binary maps them to the permanent-failure exit code) from transient I/O trouble.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "data.path: dataset path {path} does not exist; point data.path at an existing folder, tar shard or IDX file"
    )]
    NotFound { path: PathBuf },
    #[error(
        "data.path: dataset {path} yields no images ({detail}); add images there or point data.path at a dataset that has them"
    )]
    Empty { path: PathBuf, detail: String },
    #[error("{field}: {message}")]
    InvalidConfig {
        field: &'static str,
        message: String,
    },
    #[error("invalid IDX file {path}: {reason}")]
    InvalidIdx { path: PathBuf, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One image could not be decoded; the loader skips it and counts it.
    #[error("corrupt or unreadable image {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error(
        "data.path: every image of dataset {path} is corrupt or unreadable ({skipped} skipped); the log names each one: replace them or point data.path at a readable dataset"
    )]
    NothingReadable { path: String, skipped: u64 },
    #[error("data loader worker failed: {0}")]
    Worker(String),
    #[error("data loader worker failed: cannot start a loader thread: {0}")]
    Spawn(#[source] std::io::Error),
}

impl DataError {
    /// True when retrying cannot help: bad configuration, or a dataset that is missing, empty
    /// or wholly unreadable.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DataError::NotFound { .. }
                | DataError::Empty { .. }
                | DataError::InvalidConfig { .. }
                | DataError::InvalidIdx { .. }
                | DataError::NothingReadable { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::NotFound { path }
        } else {
            DataError::Io { path, source }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_datasets_are_permanent_but_io_trouble_is_not() {
        let missing = DataError::io("/nope", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(matches!(missing, DataError::NotFound { .. }));
        assert!(missing.is_permanent());
        assert!(missing.to_string().contains("/nope"));
        let io = DataError::io("/x", std::io::Error::other("disk on fire"));
        assert!(!io.is_permanent());
        let corrupt = DataError::Corrupt {
            what: "a.jpg".into(),
            reason: "bad".into(),
        };
        assert!(!corrupt.is_permanent());
    }
}
