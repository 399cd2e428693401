//! Feed arbitrary bytes to the NBD server as a client stream (handshake and
//! transmission), against fresh in-memory exports. A panic anywhere in the
//! server, or a connection that does not end within 5 seconds after the
//! input ends (a hang), is a finding.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use chainvault_nbd::testing::{feed_client_bytes, fuzz_server};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let server = fuzz_server();
    if rt
        .block_on(feed_client_bytes(&server, data, Duration::from_secs(5)))
        .is_err()
    {
        panic!("server hung on a {}-byte input", data.len());
    }
});
