//! FUSE restore tree. Built in a later issue (file-level restore).
