//! The libvirt domain XML of a keel VM: shared memfd memory (vhost-user
//! backends map guest RAM), one `vhostuser` disk per volume pointing at
//! keel's vhost-user-blk socket (with reconnect, so a restarted backend is
//! picked up again), the boot firmware, a serial console on a unix socket
//! with a log file, VNC on loopback and a pvpanic device.

use std::fmt::Write;
use std::path::PathBuf;

use keel_firmware::guest_firmware::{BootFirmware, FirmwareFiles};

/// Hardware acceleration for the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's TCG emulation, where KVM is missing or unusable.
    Tcg,
}

#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// VM id: the domain UUID, and `keel-<id>` its name.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub firmware: BootFirmware,
    /// The VM's NVRAM (UEFI only).
    pub nvram: Option<PathBuf>,
    /// vhost-user-blk sockets, boot disk first.
    pub disk_sockets: Vec<PathBuf>,
    /// NICs: MAC and keel's vhost-user-net socket, eth0 first.
    pub nics: Vec<(String, PathBuf)>,
    pub console_socket: PathBuf,
    pub console_log: PathBuf,
    pub accel: Accel,
}

pub fn domain_name(vm_id: &str) -> String {
    format!("keel-{vm_id}")
}

/// Escapes text for an XML attribute or element.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// Free PCIe root ports for disks attached to a running VM.
const HOTPLUG_PORTS: usize = 4;

/// The `<disk>` element of a volume served on `socket`, for the domain
/// definition (with its place in the boot order) and for hot-plug.
pub fn disk(socket: &std::path::Path, target: &str, boot_order: Option<usize>) -> String {
    let boot = boot_order
        .map(|n| format!("      <boot order='{n}'/>\n"))
        .unwrap_or_default();
    format!(
        "    <disk type='vhostuser' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source type='unix' path='{}'><reconnect enabled='yes' timeout='1'/></source>\n      <target dev='{}' bus='virtio'/>\n{boot}    </disk>\n",
        esc(&socket.display().to_string()),
        esc(target)
    )
}

/// The first disk target (vda..vdp) not in `used`.
pub fn free_target(used: &[String]) -> Option<String> {
    (0..16).map(target).find(|t| !used.contains(t))
}

/// What keel reads back from a running domain's live XML.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LiveDomain {
    /// Each disk's target (vda..) and its vhost-user socket.
    pub disks: Vec<(String, String)>,
    /// The VNC port QEMU listens on.
    pub vnc_port: Option<u16>,
}

impl LiveDomain {
    /// Parses libvirt's domain XML; anything it cannot read is left out.
    pub fn parse(xml: &str) -> LiveDomain {
        let Ok(doc) = roxmltree::Document::parse(xml) else {
            return LiveDomain::default();
        };
        let mut live = LiveDomain::default();
        for node in doc.descendants() {
            match node.tag_name().name() {
                "disk" => {
                    let child = |name: &str, attr: &str| {
                        node.children()
                            .find(|c| c.tag_name().name() == name)
                            .and_then(|c| c.attribute(attr))
                            .map(str::to_owned)
                    };
                    if let (Some(dev), Some(path)) =
                        (child("target", "dev"), child("source", "path"))
                    {
                        live.disks.push((dev, path));
                    }
                }
                "graphics" if node.attribute("type") == Some("vnc") => {
                    live.vnc_port = node
                        .attribute("port")
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|p| *p > 0);
                }
                _ => {}
            }
        }
        live
    }
}

/// Disk target names: vda, vdb, ... vdp.
fn target(i: usize) -> String {
    let letter = b"abcdefghijklmnop".get(i).copied().unwrap_or(b'z');
    format!("vd{}", char::from(letter))
}

pub fn render(spec: &DomainSpec, files: &FirmwareFiles) -> String {
    let mut x = String::new();
    let kind = match spec.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let p = |p: &std::path::Path| esc(&p.display().to_string());
    // `write!` to a String cannot fail.
    // The qemu namespace carries the per-device property override below.
    let _ = writeln!(
        x,
        "<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
    );
    let _ = writeln!(x, "  <name>{}</name>", esc(&domain_name(&spec.id)));
    let _ = writeln!(x, "  <uuid>{}</uuid>", esc(&spec.id));
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", spec.vcpus);
    x.push_str("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n");
    match spec.firmware {
        BootFirmware::Bios => {}
        BootFirmware::Uefi { secure_boot } => {
            let secure = if secure_boot { "yes" } else { "no" };
            let _ = writeln!(
                x,
                "    <loader readonly='yes' secure='{secure}' type='pflash'>{}</loader>",
                p(spec.firmware.code(files))
            );
            if let Some(nvram) = &spec.nvram {
                let _ = writeln!(x, "    <nvram>{}</nvram>", p(nvram));
            }
        }
    }
    x.push_str("  </os>\n  <features><acpi/>");
    if matches!(spec.firmware, BootFirmware::Uefi { secure_boot: true }) {
        x.push_str("<smm state='on'/>");
    }
    x.push_str("</features>\n");
    if matches!(spec.firmware, BootFirmware::Uefi { secure_boot: true }) {
        // OVMF's SMM build hangs at start when the machine offers S3.
        x.push_str("  <pm><suspend-to-mem enabled='no'/></pm>\n");
    }
    // vhost-user devices need guest RAM the backend can map.
    x.push_str("  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n");
    // QEMU runs as root so it can reach keel's sockets in the state dir.
    x.push_str(
        "  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\n",
    );
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    for (i, sock) in spec.disk_sockets.iter().enumerate() {
        x.push_str(&disk(sock, &target(i), Some(i + 1)));
    }
    // q35 hot-plugs PCIe devices only into free root ports: keep some spare
    // for disks attached while the VM runs (the root complex is named so
    // the ports do not claim its index).
    x.push_str("    <controller type='pci' index='0' model='pcie-root'/>\n");
    for _ in 0..HOTPLUG_PORTS {
        x.push_str("    <controller type='pci' model='pcie-root-port'/>\n");
    }
    for (i, (mac, sock)) in spec.nics.iter().enumerate() {
        let _ = writeln!(
            x,
            "    <interface type='vhostuser'>\n      <alias name='ua-nic{i}'/>\n      <mac address='{}'/>\n      <source type='unix' path='{}' mode='client'><reconnect enabled='yes' timeout='1'/></source>\n      <model type='virtio'/>\n    </interface>",
            esc(mac),
            p(sock)
        );
    }
    let _ = writeln!(
        x,
        "    <serial type='unix'>\n      <source mode='bind' path='{}'/>\n      <log file='{}' append='on'/>\n      <target port='0'/>\n    </serial>",
        p(&spec.console_socket),
        p(&spec.console_log)
    );
    x.push_str("    <console type='unix'><target type='serial' port='0'/></console>\n");
    x.push_str("    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>\n");
    x.push_str("    <panic model='isa'/>\n");
    x.push_str("  </devices>\n");
    if !spec.nics.is_empty() {
        // QEMU 7.2 crashes setting up MSI-X vector notifiers for
        // vhost-user-net under TCG; legacy interrupts avoid it.
        x.push_str("  <qemu:override>\n");
        for i in 0..spec.nics.len() {
            let _ = writeln!(
                x,
                "    <qemu:device alias='ua-nic{i}'><qemu:frontend><qemu:property name='vectors' type='unsigned' value='0'/></qemu:frontend></qemu:device>"
            );
        }
        x.push_str("  </qemu:override>\n");
    }
    x.push_str("</domain>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uefi_vm_with_two_disks() {
        let spec = DomainSpec {
            id: "0b7e0d6c-0000-4000-8000-000000000001".into(),
            vcpus: 2,
            memory_mib: 512,
            firmware: BootFirmware::Uefi { secure_boot: false },
            nvram: Some("/s/vms/x/nvram.fd".into()),
            disk_sockets: vec!["/s/run/a.sock".into(), "/s/run/b&.sock".into()],
            nics: vec![("fa:16:3e:00:00:01".into(), "/s/run/p.net.sock".into())],
            console_socket: "/s/vms/x/console.sock".into(),
            console_log: "/s/vms/x/console.log".into(),
            accel: Accel::Tcg,
        };
        let xml = render(&spec, &FirmwareFiles::default());
        assert!(xml.starts_with("<domain type='qemu' "));
        assert!(xml.contains("<mac address='fa:16:3e:00:00:01'/>"));
        assert!(xml.contains("<qemu:device alias='ua-nic0'>"));
        assert!(xml.contains("<name>keel-0b7e0d6c-0000-4000-8000-000000000001</name>"));
        assert!(xml.contains("<nvram>/s/vms/x/nvram.fd</nvram>"));
        assert!(xml.contains("path='/s/run/a.sock'"));
        assert!(xml.contains("path='/s/run/b&amp;.sock'"));
        assert!(xml.contains("<target dev='vdb' bus='virtio'/>"));
        assert!(xml.contains("<boot order='2'/>"));
        assert!(xml.contains("<access mode='shared'/>"));
        assert!(xml.contains("secure='no'"));
        assert!(!xml.contains("<smm") && !xml.contains("<pm>"));
        let secure = render(
            &DomainSpec {
                firmware: BootFirmware::Uefi { secure_boot: true },
                ..spec
            },
            &FirmwareFiles::default(),
        );
        assert!(secure.contains(
            "<loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.secboot.fd</loader>"
        ));
        assert!(secure.contains("<smm state='on'/>"));
        assert!(secure.contains("<pm><suspend-to-mem enabled='no'/></pm>"));
    }

    #[test]
    fn live_xml_gives_disks_and_vnc_port() {
        let xml = "<domain><devices><disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
            <source type='unix' path='/s/run/a.sock'><reconnect enabled='yes' timeout='1'/></source>\
            <target dev='vda' bus='virtio'/></disk>\
            <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'/></devices></domain>";
        let live = LiveDomain::parse(xml);
        assert_eq!(
            live.disks,
            vec![("vda".to_owned(), "/s/run/a.sock".to_owned())]
        );
        assert_eq!(live.vnc_port, Some(5901));
        assert_eq!(
            LiveDomain::parse("<domain><graphics type='vnc' port='-1'/></domain>").vnc_port,
            None
        );
        assert_eq!(LiveDomain::parse("not xml"), LiveDomain::default());
        assert_eq!(
            free_target(&["vda".into(), "vdc".into()]).as_deref(),
            Some("vdb")
        );
    }

    #[test]
    fn bios_vm_has_no_loader() {
        let spec = DomainSpec {
            id: "x".into(),
            vcpus: 1,
            memory_mib: 128,
            firmware: BootFirmware::Bios,
            nvram: None,
            disk_sockets: vec![],
            nics: vec![],
            console_socket: "/c".into(),
            console_log: "/l".into(),
            accel: Accel::Kvm,
        };
        let xml = render(&spec, &FirmwareFiles::default());
        assert!(xml.starts_with("<domain type='kvm' "));
        assert!(!xml.contains("qemu:override"));
        assert!(!xml.contains("<loader"));
    }
}
