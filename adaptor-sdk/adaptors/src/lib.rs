//! Reference FractOS adaptors.
//!
//! * [`storage`]: a block store over a file or block device;
//! * [`compute`]: an image-verification "accelerator" on the CPU behind
//!   [`compute::VerifyBackend`];
//! * [`image`]: the image format and a deterministic face-like generator.
#![forbid(unsafe_code)]

pub mod bench;
pub mod compute;
pub mod demo;
pub mod image;
pub mod netns;
pub mod pipeline;
pub mod storage;

/// Errors of the compute adaptor.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ComputeError {
    /// The input is not a valid image.
    #[error("bad image: {0}; send a FIMG-encoded grayscale image of at least 8x8")]
    BadImage(&'static str),
    /// Feature vectors of different kernels were compared.
    #[error("feature vectors differ in length ({left} vs {right}); enroll with the same backend")]
    FeatureMismatch {
        /// Left length.
        left: usize,
        /// Right length.
        right: usize,
    },
}

/// Errors of the storage adaptor.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The range is outside the store.
    #[error("range {offset}+{len} is outside the {size}-byte store")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Store size.
        size: u64,
    },
    /// The file failed.
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Errors of the pipeline services and client.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An SDK operation failed.
    #[error(transparent)]
    Sdk(#[from] fractos_sdk::SdkError),
    /// The storage backend failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A peer sent arguments that do not fit the service's layout.
    #[error("protocol: {0}")]
    Protocol(String),
}
