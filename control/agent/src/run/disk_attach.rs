//! Attaching and detaching a VM's disks, and growing a volume.
//!
//! A stopped VM only changes its spec: the domain is redefined from it at
//! the next start. A running VM hot-plugs: keel's disk server comes first,
//! then the hypervisor device. The guest must release a disk before it is
//! unplugged, so detach waits for the device to leave the live domain
//! before the disk server stops (stopping it earlier would fail the guest's
//! in-flight I/O).

use std::time::{Duration, Instant};

use keel_control::api::records::{self, Record};
use keel_control::api::vms::{self, VmSpec};
use keel_control::api::volumes::{self, VolumeSpec};
use virt::domain::Domain;
use virt::sys;

use super::{Agent, StepError, IDLE};
use crate::domain_xml::{self, LiveDomain};
use crate::provision;

/// How long a guest gets to release a disk being detached.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    pub(super) fn vm_attach_volume(
        &mut self,
        vm: &Record,
        volume_id: &str,
    ) -> Result<(), StepError> {
        let volume = self.volume(volume_id)?;
        let mut vspec: VolumeSpec = volume.spec()?;
        if let Err(e) = self.plug(&vm.meta.id, volume_id) {
            // The API reserved the volume for this VM: give it back.
            vspec.attached_to = None;
            vspec.status_reason = format!("attaching to VM {} failed: {e}", vm.meta.id);
            self.observe(
                volumes::KIND,
                volume_id,
                volumes::AVAILABLE,
                Some(records::to_json(&vspec)?),
            )?;
            return Err(e);
        }
        let mut spec: VmSpec = vm.spec()?;
        if !spec.volume_ids.iter().any(|v| v == volume_id) {
            spec.volume_ids.push(volume_id.to_owned());
        }
        self.observe(
            vms::KIND,
            &vm.meta.id,
            &vm.meta.status,
            Some(records::to_json(&spec)?),
        )?;
        vspec.status_reason.clear();
        self.observe(
            volumes::KIND,
            volume_id,
            volumes::IN_USE,
            Some(records::to_json(&vspec)?),
        )
    }

    pub(super) fn vm_detach_volume(
        &mut self,
        vm: &Record,
        volume_id: &str,
    ) -> Result<(), StepError> {
        let volume = self.volume(volume_id)?;
        let mut vspec: VolumeSpec = volume.spec()?;
        if let Err(e) = self.unplug(&vm.meta.id, volume_id) {
            vspec.status_reason = format!("detaching from VM {} failed: {e}", vm.meta.id);
            self.observe(
                volumes::KIND,
                volume_id,
                volumes::IN_USE,
                Some(records::to_json(&vspec)?),
            )?;
            return Err(e);
        }
        let mut spec: VmSpec = vm.spec()?;
        spec.volume_ids.retain(|v| v != volume_id);
        self.observe(
            vms::KIND,
            &vm.meta.id,
            &vm.meta.status,
            Some(records::to_json(&spec)?),
        )?;
        vspec.attached_to = None;
        vspec.status_reason.clear();
        self.observe(
            volumes::KIND,
            volume_id,
            volumes::AVAILABLE,
            Some(records::to_json(&vspec)?),
        )
    }

    /// Grows a volume that no running VM uses (the API checks that).
    pub(super) fn volume_resize(
        &mut self,
        volume: &Record,
        size_bytes: u64,
    ) -> Result<(), StepError> {
        let mut spec: VolumeSpec = volume.spec()?;
        let path = volumes::volume_path(&self.config.state_dir, &volume.meta.id);
        if spec.format == volumes::QCOW2 {
            // qemu-img rewrites the metadata the server keeps in memory:
            // the server (a STOPPED VM's) must be gone first.
            self.disks.stop(&volume.meta.id);
        }
        let target = provision::Target {
            format: &spec.format,
            cluster_size: spec.cluster_size,
            thick: spec.provisioning == "thick",
        };
        let result = provision::grow(&path, size_bytes, target);
        let status = volume.meta.status.clone();
        match result {
            Ok(()) => {
                spec.size_bytes = size_bytes;
                spec.status_reason.clear();
                self.observe(
                    volumes::KIND,
                    &volume.meta.id,
                    &status,
                    Some(records::to_json(&spec)?),
                )
            }
            Err(e) => {
                spec.status_reason = format!("resize failed: {e}");
                self.observe(
                    volumes::KIND,
                    &volume.meta.id,
                    &status,
                    Some(records::to_json(&spec)?),
                )?;
                Err(e.into())
            }
        }
    }

    fn volume(&self, id: &str) -> Result<Record, StepError> {
        self.get(volumes::KIND, id)?
            .ok_or_else(|| StepError::Invalid(format!("volume {id} is gone")))
    }

    /// The VM's domain if QEMU runs it.
    fn running_domain(&mut self, vm_id: &str) -> Result<Option<Domain>, StepError> {
        match self.lookup(vm_id)? {
            Some(d) if d.is_active()? => Ok(Some(d)),
            _ => Ok(None),
        }
    }

    /// Hot-plugs the volume into the VM if it runs.
    fn plug(&mut self, vm_id: &str, volume_id: &str) -> Result<(), StepError> {
        let Some(domain) = self.running_domain(vm_id)? else {
            return Ok(());
        };
        let path = volumes::volume_path(&self.config.state_dir, volume_id);
        let socket = self.disks.ensure(volume_id, &path)?;
        let live = LiveDomain::parse(&domain.get_xml_desc(0)?);
        let used: Vec<String> = live.disks.into_iter().map(|(dev, _)| dev).collect();
        let Some(target) = domain_xml::free_target(&used) else {
            self.disks.stop(volume_id);
            return Err(StepError::Invalid("the VM has no free disk target".into()));
        };
        let xml = domain_xml::disk(&socket, &target, None);
        if let Err(e) = domain.attach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE) {
            self.disks.stop(volume_id);
            return Err(e.into());
        }
        tracing::info!(vm = vm_id, volume = volume_id, target = %target, "disk hot-plugged");
        Ok(())
    }

    /// Unplugs the volume from the VM if it runs, then stops its server.
    fn unplug(&mut self, vm_id: &str, volume_id: &str) -> Result<(), StepError> {
        let socket = self.disks.socket(volume_id);
        let source = socket.display().to_string();
        if let Some(domain) = self.running_domain(vm_id)? {
            let live = LiveDomain::parse(&domain.get_xml_desc(0)?);
            if let Some((target, _)) = live.disks.iter().find(|(_, p)| *p == source) {
                let xml = domain_xml::disk(&socket, target, None);
                domain.detach_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)?;
                let start = Instant::now();
                while LiveDomain::parse(&domain.get_xml_desc(0)?)
                    .disks
                    .iter()
                    .any(|(_, p)| *p == source)
                {
                    if start.elapsed() > UNPLUG_TIMEOUT {
                        return Err(StepError::Invalid(format!(
                            "the guest did not release {target} within {} s; it stays attached",
                            UNPLUG_TIMEOUT.as_secs()
                        )));
                    }
                    std::thread::sleep(IDLE);
                }
                tracing::info!(vm = vm_id, volume = volume_id, target = %target, "disk unplugged");
            }
        }
        self.disks.stop(volume_id);
        Ok(())
    }
}
