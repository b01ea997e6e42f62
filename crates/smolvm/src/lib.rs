//! smolvm runtime.
