//! Shared pieces of the shmrelay tools (`relaybench`, `relayctl`).
