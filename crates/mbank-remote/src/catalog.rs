//! [`RemoteCatalog`]: [`CatalogApi`] over the bank server's machine, version, lease and
//! writer endpoints (`docs/api.md`).

use mbank_catalog::{
    CatalogApi, CatalogError, CommitOutcome, ForgetReport, LabelChange, Labels, Lease, MachineInfo,
    MachineSettings, NamedStream, Policy, VersionInfo, VersionLabels, WriterInfo,
};
use mbank_core::{DiskIndex, MachineName, MemoryIndex, VersionId};
use ureq::http::Method;

use crate::client::{Client, ClientError, MAX_ANSWER, Payload, seg};
use crate::wire::{
    self, CommitHeader, CommitResponse, ForgetRequest, Head, HeadRequest, Held, LeaseRequest,
    LeaseResponse, PolicyBody, Released, Removed, RenameRequest, SessionBody, WriterRequest,
};

/// A bank server's catalog. Cloning it (or [`CatalogApi::reopen`]) gives another handle
/// on the same connection pool.
#[derive(Clone, Debug)]
pub struct RemoteCatalog {
    client: Client,
}

/// `/machines/{user}/{name}` for a machine name (`user/name`).
pub(crate) fn mpath(machine: &str) -> String {
    match machine.split_once('/') {
        Some((user, name)) => format!("/machines/{}/{}", seg(user), seg(name)),
        None => format!("/machines/{}", seg(machine)),
    }
}

fn vpath(v: &VersionInfo) -> String {
    format!("{}/versions/{}", mpath(v.machine.as_str()), v.id.to_hex())
}

/// Turns a client error into the catalog's (the table in `docs/api.md`). `machine` is
/// the machine the request was about, used when the answer does not name one.
pub fn catalog_error(e: ClientError, machine: Option<&str>) -> CatalogError {
    let ClientError::Api { url, body, .. } = e else {
        return CatalogError::Remote(e.to_string());
    };
    let machine = || {
        body.machine
            .clone()
            .or_else(|| machine.map(str::to_string))
            .unwrap_or_default()
    };
    match body.kind.as_str() {
        "machine_not_found" => CatalogError::MachineNotFound(machine()),
        "version_not_found" => CatalogError::VersionNotFound {
            machine: machine(),
            prefix: body.prefix.clone().unwrap_or_default(),
        },
        "ambiguous_version" => CatalogError::AmbiguousVersion {
            machine: machine(),
            prefix: body.prefix.clone().unwrap_or_default(),
            count: body.count.unwrap_or(0),
        },
        "no_head" => CatalogError::NoHead(machine()),
        "machine_exists" => CatalogError::MachineExists(machine()),
        "lease_held" if body.lease.is_some() => {
            let held = body.lease.clone().expect("checked");
            CatalogError::LeaseHeld {
                machine: held.machine.clone(),
                held: Box::new(held),
            }
        }
        "head_moved" => CatalogError::HeadMoved {
            machine: machine(),
            expected: body.expected_head,
            head: body.head,
        },
        "in_session" if body.lease.is_some() => CatalogError::InSession {
            machine: machine(),
            held: Box::new(body.lease.clone().expect("checked")),
        },
        "unauthorized" => CatalogError::Unauthorized(format!("{} (bank {url})", body.message)),
        _ => CatalogError::Remote(body.message.clone()),
    }
}

impl RemoteCatalog {
    /// The catalog of the bank `client` talks to.
    pub fn new(client: Client) -> Self {
        RemoteCatalog { client }
    }

    /// The client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
        machine: Option<&str>,
    ) -> Result<T, CatalogError> {
        self.client
            .get_json(path, what)
            .map_err(|e| catalog_error(e, machine))
    }

    fn send<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        what: &str,
        body: &B,
        machine: Option<&str>,
    ) -> Result<T, CatalogError> {
        self.client
            .send_json(method, path, what, body)
            .map_err(|e| catalog_error(e, machine))
    }

    /// A request without a body whose answer is JSON.
    fn bare<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        what: &str,
        machine: Option<&str>,
    ) -> Result<T, CatalogError> {
        let body = self
            .client
            .call(method, path, what, Payload::Empty, MAX_ANSWER)
            .map_err(|e| catalog_error(e, machine))?;
        self.client
            .parse(&body, what)
            .map_err(|e| catalog_error(e, machine))
    }

    /// A request without a body whose answer does not matter (`204`).
    fn empty(&self, method: Method, path: &str, what: &str) -> Result<(), CatalogError> {
        self.client
            .call(method, path, what, Payload::Empty, 1 << 16)
            .map(drop)
            .map_err(|e| catalog_error(e, None))
    }
}

impl CatalogApi for RemoteCatalog {
    fn machine(&self, name: &MachineName) -> Result<Option<MachineInfo>, CatalogError> {
        let what = format!("machine {name}");
        match self.get(&mpath(name.as_str()), &what, Some(name.as_str())) {
            Ok(m) => Ok(Some(m)),
            Err(CatalogError::MachineNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn machines(&self) -> Result<Vec<MachineInfo>, CatalogError> {
        self.get("/machines", "list of machines", None)
    }

    fn versions(&self, machine: &MachineName) -> Result<Vec<VersionInfo>, CatalogError> {
        let path = format!("{}/versions", mpath(machine.as_str()));
        let what = format!("versions of {machine}");
        self.get(&path, &what, Some(machine.as_str()))
    }

    fn resolve(
        &self,
        machine: &MachineName,
        prefix: Option<&str>,
    ) -> Result<VersionInfo, CatalogError> {
        let mut path = format!("{}/resolve", mpath(machine.as_str()));
        if let Some(p) = prefix {
            path.push_str("?version=");
            path.push_str(&seg(p));
        }
        let what = format!("version {machine}@{}", prefix.unwrap_or("head"));
        self.get(&path, &what, Some(machine.as_str()))
    }

    fn disk_index(&self, v: &VersionInfo) -> Result<DiskIndex, CatalogError> {
        let what = format!("disk index of {}@{}", v.machine, v.id);
        let bytes = self
            .client
            .call(
                Method::GET,
                &format!("{}/index", vpath(v)),
                &what,
                Payload::Empty,
                MAX_ANSWER,
            )
            .map_err(|e| catalog_error(e, Some(v.machine.as_str())))?;
        DiskIndex::from_bytes(&bytes).map_err(|source| CatalogError::BadIndex {
            machine: v.machine.to_string(),
            version: v.id,
            source,
        })
    }

    fn stream(&self, v: &VersionInfo, name: &str) -> Result<Option<MemoryIndex>, CatalogError> {
        let what = format!("stream {name} of {}@{}", v.machine, v.id);
        let path = format!("{}/streams/{}", vpath(v), seg(name));
        let bytes = match self
            .client
            .call(Method::GET, &path, &what, Payload::Empty, MAX_ANSWER)
        {
            Ok(b) => b,
            Err(e) if e.kind() == Some("not_found") => return Ok(None),
            Err(e) => return Err(catalog_error(e, Some(v.machine.as_str()))),
        };
        MemoryIndex::from_bytes(&bytes)
            .map(Some)
            .map_err(|source| CatalogError::BadIndex {
                machine: v.machine.to_string(),
                version: v.id,
                source,
            })
    }

    fn streams(&self, v: &VersionInfo) -> Result<Vec<NamedStream>, CatalogError> {
        v.streams
            .iter()
            .map(|name| {
                let idx = self.stream(v, name)?.ok_or_else(|| {
                    CatalogError::Remote(format!(
                        "the bank at {} lists a stream {name} for {}@{} but has none",
                        self.client.url(),
                        v.machine,
                        v.id
                    ))
                })?;
                Ok((name.clone(), idx))
            })
            .collect()
    }

    fn commit_version(
        &mut self,
        info: &VersionInfo,
        index: &DiskIndex,
        streams: &[NamedStream],
        expected_head: Option<VersionId>,
    ) -> Result<CommitOutcome, CatalogError> {
        let index = index.to_bytes();
        let stream_bytes: Vec<Vec<u8>> = streams.iter().map(|(_, s)| s.to_bytes()).collect();
        let header = CommitHeader {
            info: info.clone(),
            expected_head,
            index_len: index.len() as u64,
            streams: streams
                .iter()
                .zip(&stream_bytes)
                .map(|((name, _), b)| (name.clone(), b.len() as u64))
                .collect(),
        };
        let body = wire::commit_body(&header, &index, &stream_bytes);
        if body.len() > wire::MAX_COMMIT {
            return Err(CatalogError::Remote(format!(
                "the commit of {}@{} is {} bytes (its indexes); a bank server takes at most {}",
                info.machine,
                info.id,
                body.len(),
                wire::MAX_COMMIT
            )));
        }
        let what = format!("commit of {}@{}", info.machine, info.id);
        let path = format!("{}/versions", mpath(info.machine.as_str()));
        let machine = Some(info.machine.as_str());
        let answer = self
            .client
            .call(Method::POST, &path, &what, Payload::Bytes(&body), 1 << 20)
            .map_err(|e| catalog_error(e, machine))?;
        let r: CommitResponse = self
            .client
            .parse(&answer, &what)
            .map_err(|e| catalog_error(e, machine))?;
        Ok(r.outcome)
    }

    fn remove_version(&mut self, v: &VersionInfo) -> Result<Option<VersionId>, CatalogError> {
        let what = format!("removal of {}@{}", v.machine, v.id);
        let h: Head = self.bare(Method::DELETE, &vpath(v), &what, Some(v.machine.as_str()))?;
        Ok(h.head)
    }

    fn remove_machine(&mut self, machine: &MachineName) -> Result<u64, CatalogError> {
        let what = format!("removal of {machine}");
        let r: Removed = self.bare(
            Method::DELETE,
            &mpath(machine.as_str()),
            &what,
            Some(machine.as_str()),
        )?;
        Ok(r.removed)
    }

    fn register_writer(
        &self,
        pid: u32,
        host: &str,
        what: &str,
    ) -> Result<WriterInfo, CatalogError> {
        let req = WriterRequest {
            pid,
            host: host.into(),
            what: what.into(),
        };
        self.send(
            Method::POST,
            "/writers",
            "registration of a writer",
            &req,
            None,
        )
    }

    fn heartbeat(&self, id: i64) -> Result<(), CatalogError> {
        self.empty(
            Method::POST,
            &format!("/writers/{id}/heartbeat"),
            "writer heartbeat",
        )
    }

    fn unregister_writer(&self, id: i64) -> Result<(), CatalogError> {
        self.empty(Method::DELETE, &format!("/writers/{id}"), "end of a writer")
    }

    fn lease(&self, machine: &MachineName) -> Result<Option<Lease>, CatalogError> {
        let what = format!("lease on {machine}");
        let path = format!("{}/lease", mpath(machine.as_str()));
        self.get(&path, &what, Some(machine.as_str()))
    }

    fn take_lease(
        &mut self,
        lease: &Lease,
        replace: Option<&str>,
    ) -> Result<Option<Lease>, CatalogError> {
        let req = LeaseRequest {
            lease: lease.clone(),
            replace: replace.map(str::to_string),
        };
        let what = format!("lease on {}", lease.machine);
        let path = format!("{}/lease", mpath(&lease.machine));
        let r: LeaseResponse = self.send(Method::PUT, &path, &what, &req, Some(&lease.machine))?;
        Ok(r.replaced)
    }

    fn release_lease(&self, machine: &MachineName, session: &str) -> Result<bool, CatalogError> {
        let what = format!("release of the lease on {machine}");
        let path = format!("{}/lease?session={}", mpath(machine.as_str()), seg(session));
        let r: Released = self.bare(Method::DELETE, &path, &what, Some(machine.as_str()))?;
        Ok(r.released)
    }

    fn session_bases(
        &self,
        machine: &MachineName,
    ) -> Result<Vec<(VersionId, String)>, CatalogError> {
        let what = format!("sessions of {machine}");
        let path = format!("{}/sessions", mpath(machine.as_str()));
        self.get(&path, &what, Some(machine.as_str()))
    }

    fn heartbeat_lease(&self, machine: &MachineName, session: &str) -> Result<bool, CatalogError> {
        let what = format!("heartbeat of the lease on {machine}");
        let path = format!("{}/lease/heartbeat", mpath(machine.as_str()));
        let req = SessionBody {
            session: session.into(),
        };
        let r: Held = self.send(Method::POST, &path, &what, &req, Some(machine.as_str()))?;
        Ok(r.held)
    }

    fn lease_checkpoint(
        &self,
        machine: &MachineName,
        session: &str,
        version: VersionId,
    ) -> Result<bool, CatalogError> {
        let what = format!("the checkpoint of the session on {machine}");
        let path = format!("{}/lease/checkpoint", mpath(machine.as_str()));
        let req = wire::CheckpointBody {
            session: session.into(),
            version: version.to_hex(),
        };
        let r: Held = self.send(Method::POST, &path, &what, &req, Some(machine.as_str()))?;
        Ok(r.held)
    }

    fn forget(
        &mut self,
        machine: &MachineName,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<ForgetReport, CatalogError> {
        let what = format!("forget on {machine}");
        let path = format!("{}/forget", mpath(machine.as_str()));
        let req = ForgetRequest {
            policy: *policy,
            dry_run,
        };
        self.send(Method::POST, &path, &what, &req, Some(machine.as_str()))
    }

    fn set_head(
        &mut self,
        machine: &MachineName,
        to: VersionId,
        expected: Option<VersionId>,
    ) -> Result<(), CatalogError> {
        let what = format!("head move of {machine}");
        let path = format!("{}/head", mpath(machine.as_str()));
        let req = HeadRequest { to, expected };
        let _: Head = self.send(Method::PUT, &path, &what, &req, Some(machine.as_str()))?;
        Ok(())
    }

    fn rename_machine(&mut self, old: &MachineName, new: &MachineName) -> Result<(), CatalogError> {
        let what = format!("rename of {old} to {new}");
        let path = format!("{}/rename", mpath(old.as_str()));
        let req = RenameRequest { to: new.clone() };
        let _: RenameRequest = self.send(Method::POST, &path, &what, &req, Some(old.as_str()))?;
        Ok(())
    }

    fn label(&mut self, v: &VersionInfo, change: &LabelChange) -> Result<Labels, CatalogError> {
        let what = format!("notes and tags of {}@{}", v.machine, v.id);
        let path = format!("{}/labels", vpath(v));
        self.send(Method::POST, &path, &what, change, Some(v.machine.as_str()))
    }

    fn labels(&self, machine: &MachineName) -> Result<Vec<VersionLabels>, CatalogError> {
        let what = format!("notes and tags of {machine}");
        let path = format!("{}/labels", mpath(machine.as_str()));
        self.get(&path, &what, Some(machine.as_str()))
    }

    fn policy(&self, machine: &MachineName) -> Result<Option<Policy>, CatalogError> {
        let what = format!("retention policy of {machine}");
        let path = format!("{}/policy", mpath(machine.as_str()));
        let r: PolicyBody = self.get(&path, &what, Some(machine.as_str()))?;
        Ok(r.policy)
    }

    fn set_policy(
        &mut self,
        machine: &MachineName,
        policy: Option<&Policy>,
    ) -> Result<(), CatalogError> {
        let what = format!("retention policy of {machine}");
        let path = format!("{}/policy", mpath(machine.as_str()));
        let req = PolicyBody {
            policy: policy.copied(),
        };
        let _: PolicyBody = self.send(Method::PUT, &path, &what, &req, Some(machine.as_str()))?;
        Ok(())
    }

    fn settings(&self, machine: &MachineName) -> Result<MachineSettings, CatalogError> {
        let what = format!("settings of {machine}");
        let path = format!("{}/settings", mpath(machine.as_str()));
        self.get(&path, &what, Some(machine.as_str()))
    }

    fn set_settings(
        &mut self,
        machine: &MachineName,
        settings: &MachineSettings,
    ) -> Result<(), CatalogError> {
        let what = format!("settings of {machine}");
        let path = format!("{}/settings", mpath(machine.as_str()));
        let _: MachineSettings =
            self.send(Method::PUT, &path, &what, settings, Some(machine.as_str()))?;
        Ok(())
    }

    fn reopen(&self) -> Result<Box<dyn CatalogApi>, CatalogError> {
        Ok(Box::new(self.clone()))
    }
}
