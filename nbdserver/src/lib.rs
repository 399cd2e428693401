//! NBD protocol server and client.
