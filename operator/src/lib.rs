//! The Dinoflow operator.
