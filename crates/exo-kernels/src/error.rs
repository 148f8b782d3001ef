//! The one error type of this crate.

/// What can go wrong building a matrix or calling a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Stored bytes that do not match the declared shape and format.
    #[error("{format} matrix of {rows}x{cols}: expected {expected} bytes of data, got {actual}")]
    DataLength {
        /// The storage format.
        format: &'static str,
        /// Rows (outputs).
        rows: usize,
        /// Columns (inputs).
        cols: usize,
        /// Bytes the shape implies.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A row length the format's blocks do not divide.
    #[error("{format} needs rows of whole {block}-element blocks, got {cols} columns")]
    BlockAlignment {
        /// The storage format.
        format: &'static str,
        /// Elements per block.
        block: usize,
        /// Columns given.
        cols: usize,
    },
    /// Input or output buffers of the wrong size.
    #[error("{what}: expected {expected} values, got {actual}")]
    Shape {
        /// Which buffer.
        what: &'static str,
        /// Values expected.
        expected: usize,
        /// Values given.
        actual: usize,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
