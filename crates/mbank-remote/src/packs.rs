//! A bank server's packs (`mbank_core::pack`; docs/api.md "Packs"): an export through
//! the server reads a version's pack segment by segment when the server has built one.

use mbank_core::VersionId;
use mbank_core::pack::Segment;
use mbank_store::{PackSource, StoreError};
use ureq::http::Method;

use crate::catalog::mpath;
use crate::client::{Client, ClientError, MAX_ANSWER, Payload};
use crate::store::store_error;

/// The packs of the bank `client` talks to.
pub struct RemotePacks {
    client: Client,
}

impl RemotePacks {
    pub fn new(client: Client) -> Self {
        RemotePacks { client }
    }
}

fn pack_path(machine: &str, version: VersionId) -> String {
    format!("{}/versions/{}/pack", mpath(machine), version.to_hex())
}

impl PackSource for RemotePacks {
    fn pack_index(&self, machine: &str, version: VersionId) -> Result<Option<Vec<u8>>, StoreError> {
        let what = format!("the pack of {machine}@{}", version.short());
        match self.client.call(
            Method::GET,
            &pack_path(machine, version),
            &what,
            Payload::Empty,
            MAX_ANSWER,
        ) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == Some("not_found") => Ok(None),
            Err(e) => Err(store_error(e, None)),
        }
    }

    fn pack_segment(
        &self,
        machine: &str,
        version: VersionId,
        n: usize,
        seg: &Segment,
    ) -> Result<Vec<u8>, StoreError> {
        let what = format!("segment {n} of the pack of {machine}@{}", version.short());
        self.client
            .call(
                Method::GET,
                &format!("{}/{n}", pack_path(machine, version)),
                &what,
                Payload::Empty,
                seg.frame_len,
            )
            .map_err(|e| store_error(e, None))
    }
}

/// Asks the server to build the pack of version `version` of `machine` (administrators
/// only); what the server's build reported (`mbank_bank::pack::PackReport`). While
/// another build runs the server answers `503`, which the client waits out.
pub fn build_pack(
    client: &Client,
    machine: &str,
    version: VersionId,
) -> Result<serde_json::Value, ClientError> {
    let what = format!("building the pack of {machine}@{}", version.short());
    let b = client.call(
        Method::POST,
        &pack_path(machine, version),
        &what,
        Payload::Empty,
        MAX_ANSWER,
    )?;
    client.parse(&b, &what)
}
