//! `/vms/{id}/volumes`: attaching a volume to a VM and detaching it.
//!
//! Both are tasks of the VM. A stopped VM gets the change at its next
//! start; a running one hot-plugs the disk (keel serves it first, then the
//! hypervisor adds the device; on detach the guest must release it). The
//! request reserves the volume at once (`ATTACHING` / `DETACHING`) so no
//! other request can take it while the task runs.

use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Action, Family, Principal};
use super::extract::ValidJson;
use super::problem::{ApiError, Problem};
use super::records::{self, to_json};
use super::respond::load;
use super::tasks::{self, Task};
use super::vms::{self, vm_for, VmSpec, MAX_DISKS};
use super::volumes::{self, VolumeSpec};
use super::AppState;

pub const ATTACHING: &str = "ATTACHING";
pub const DETACHING: &str = "DETACHING";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttach {
    /// An AVAILABLE volume of the VM's VDC.
    pub volume_id: String,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(attach_volume))
        .routes(routes!(detach_volume))
}

#[utoipa::path(post, path = "/vms/{id}/volumes", tag = "compute", request_body = VolumeAttach,
    params(("id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the volume is ATTACHING; a running VM hot-plugs it, a stopped one gets it at its next start", body = Task),
        (status = 409, description = "The VM is not RUNNING or STOPPED, a task runs on it, it has the most disks it may have, its protection group protects it, or the volume is not AVAILABLE", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No such volume in the VM's VDC", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn attach_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    ValidJson(body): ValidJson<VolumeAttach>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let vm = vm_for(
        &mut tx,
        &principal,
        &id,
        "attach a volume to",
        &[vms::RUNNING, vms::STOPPED],
    )
    .await?;
    super::protection_groups::refuse_if_member(&mut tx, &id, "attach a volume to", false).await?;
    let vm_spec: VmSpec = vm.spec()?;
    if vm_spec.volume_ids.len() >= MAX_DISKS {
        return Err(ApiError::Conflict(format!(
            "the VM already has {MAX_DISKS} disks"
        )));
    }
    let no_such = || ApiError::invalid("volume_id", format!("no volume {}", body.volume_id));
    let volume = match load(
        &mut tx,
        &principal,
        Family::Compute,
        Action::Update,
        volumes::KIND,
        &body.volume_id,
    )
    .await
    {
        Ok(v) => v,
        Err(ApiError::NotFound) => return Err(no_such()),
        Err(e) => return Err(e),
    };
    if volume.meta.vdc_id != vm.meta.vdc_id {
        return Err(no_such());
    }
    let mut spec: VolumeSpec = volume.spec()?;
    if let Some(other) = &spec.attached_to {
        return Err(ApiError::Conflict(format!(
            "volume {} is attached to VM {other}",
            body.volume_id
        )));
    }
    if volume.meta.status != volumes::AVAILABLE {
        return Err(ApiError::Conflict(format!(
            "volume {} is {}; only an AVAILABLE volume can be attached",
            body.volume_id, volume.meta.status
        )));
    }
    if let Some(home) = spec.host_id.as_deref().filter(|h| *h != vm_spec.host_id) {
        return Err(ApiError::Conflict(format!(
            "volume {} lives on host {home}, the VM runs on {}; copy it there first",
            body.volume_id, vm_spec.host_id
        )));
    }
    spec.attached_to = Some(id.clone());
    spec.status_reason.clear();
    records::observe(
        &mut tx,
        volumes::KIND,
        &body.volume_id,
        ATTACHING,
        Some(to_json(&spec)?),
    )
    .await?;
    let task = tasks::enqueue(
        &mut tx,
        vm.meta.vdc_id.as_deref(),
        vms::KIND,
        &id,
        "attach-volume",
        serde_json::json!({ "volume_id": body.volume_id }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}

#[utoipa::path(delete, path = "/vms/{id}/volumes/{volume_id}", tag = "compute",
    params(("id" = String, Path), ("volume_id" = String, Path)),
    responses(
        (status = 202, description = "Queued: the volume is DETACHING; a running VM's guest must release it first", body = Task),
        (status = 404, description = "No such VM, or the volume is not one of its disks", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The VM is not RUNNING or STOPPED, a task runs on it, the disk is the boot disk of the running VM, or its protection group protects it", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
async fn detach_volume(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, volume_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let mut tx = state.store.begin_write().await?;
    let vm = vm_for(
        &mut tx,
        &principal,
        &id,
        "detach a volume from",
        &[vms::RUNNING, vms::STOPPED],
    )
    .await?;
    super::protection_groups::refuse_if_member(&mut tx, &id, "detach a volume from", false).await?;
    let vm_spec: VmSpec = vm.spec()?;
    let Some(index) = vm_spec.volume_ids.iter().position(|v| *v == volume_id) else {
        return Err(ApiError::NotFound);
    };
    if index == 0 && vm.meta.status == vms::RUNNING {
        return Err(ApiError::Conflict(
            "the boot disk cannot be detached from a running VM; stop it first".into(),
        ));
    }
    records::observe(&mut tx, volumes::KIND, &volume_id, DETACHING, None)
        .await?
        .ok_or(ApiError::NotFound)?;
    let task = tasks::enqueue(
        &mut tx,
        vm.meta.vdc_id.as_deref(),
        vms::KIND,
        &id,
        "detach-volume",
        serde_json::json!({ "volume_id": volume_id }),
    )
    .await?;
    tx.commit().await?;
    state.changes.notify_waiters();
    Ok(tasks::accepted(&task))
}
