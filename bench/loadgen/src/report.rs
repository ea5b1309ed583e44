//! `report`: assembles a run directory into one JSON document and the Markdown report.

use crate::args::Args;

pub fn run(_a: &Args) -> Result<(), String> {
    Err("not yet".into())
}
