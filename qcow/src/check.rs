//! Consistency check and leak repair. (Being written.)
