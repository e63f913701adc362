//! The cases of `relaybench ring`: what runs (a transport, a mode, a payload) and what one run
//! of a case measured.

use anyhow::Result;

use super::ring_data::{Report, RttSamples};

/// A queue (or wake mechanism) under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    ShmRing,
    Rtrb,
    Crossbeam,
    Futex,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::ShmRing => "shm-ring",
            Transport::Rtrb => "rtrb",
            Transport::Crossbeam => "crossbeam",
            Transport::Futex => "futex",
        }
    }
}

/// How shm-ring producers write a record (`--api`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum ProducerApi {
    /// `Producer::reserve`, fill the grant, `WriteGrant::commit`.
    Grant,
    /// `Producer::push_with(len, meta, fill)`.
    PushWith,
}

/// `--modes` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    Throughput,
    Rtt,
}

/// What a case measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Throughput,
    /// Round trip, both sides polling.
    RttSpin,
    /// Round trip, both sides sleeping in the kernel on every hop.
    RttPark,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Throughput => "throughput",
            Mode::RttSpin => "rtt spin",
            Mode::RttPark => "rtt park",
        }
    }
}

/// One case of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Case {
    pub transport: Transport,
    pub mode: Mode,
    pub payload: usize,
}

/// What one run of a case measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub case: Case,
    pub frames_per_sec: Option<f64>,
    pub rtt_p50_ns: Option<u64>,
    pub rtt_p99_ns: Option<u64>,
    /// Shown in the table only.
    pub note: String,
}

impl Outcome {
    pub fn throughput(case: Case, r: &Report, note: String) -> Outcome {
        Outcome {
            case,
            frames_per_sec: Some(r.measured_frames as f64 * 1e9 / r.measured_ns as f64),
            rtt_p50_ns: None,
            rtt_p99_ns: None,
            note,
        }
    }

    pub fn rtt(case: Case, samples: &RttSamples, note: String) -> Result<Outcome> {
        let (p50, p99) = samples.percentiles()?;
        Ok(Outcome {
            case,
            frames_per_sec: None,
            rtt_p50_ns: Some(p50),
            rtt_p99_ns: Some(p99),
            note,
        })
    }
}
