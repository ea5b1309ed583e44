//! Upstream providers, one module per upstream API and its wire format. (The provider layer
//! of issue 14 fills this in; the cloud providers of issue 15 live here.)

pub mod aws;
pub mod gcp;
