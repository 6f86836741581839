//! [`Guest`]: a tiny Linux VM under QEMU for tests that need a real guest
//! (a vhost-user frontend, a VM on a keel network).
//!
//! The guest image is Debian's kernel plus a busybox initramfs built once and
//! cached under `target/keel-guest/`. Its `/init` loads the virtio modules,
//! prints [`READY`], runs the test's script (appended as a second cpio archive
//! per boot, so the cached image never changes) and then serves a shell on
//! the serial console, which [`Guest::exec`] drives.
//!
//! KVM is used only when a short probe boot under KVM reaches [`READY`]: on
//! machines where `/dev/kvm` exists but nested guests hang, everything runs
//! under TCG. Guest RAM is a shared memfd so vhost-user backends can map it.

use keel_firmware::disk::BootLoader;
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use keel_firmware::cpio::CpioWriter;
use keel_firmware::kernel::{module_name, Kernel};

use crate::{io_err, target_dir, FixtureError, Result};

/// Printed by `/init` once the modules are loaded, before the test's script.
pub const READY: &str = "KEEL_GUEST_READY";
/// Printed by `/init` after the test's script, with its exit status.
pub const SCRIPT_EXIT: &str = "KEEL_SCRIPT_EXIT=";
/// Printed by `/init` when its command loop (for [`Guest::exec`]) starts.
const SHELL_READY: &str = "KEEL_SHELL_READY";

/// Modules every guest loads (with their dependencies, from `modules.dep`).
const DEFAULT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];

/// A KVM guest reaches `/init` in about a second; one that has not after
/// this long is the nested-virtualization hang, not a slow boot.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Boot to [`READY`] takes about 5 s under TCG on an idle machine; CI runs
/// several guests and builds at once.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run && mount -t tmpfs tmpfs /tmp
# Kernel messages would interleave with what tests read off the console.
echo 1 > /proc/sys/kernel/printk
stty -echo 2>/dev/null
for m in $(cat /etc/keel-modules); do insmod "/lib/modules/$m" || echo "KEEL_INSMOD_FAILED $m"; done
ip link set lo up 2>/dev/null
echo KEEL_GUEST_READY
if [ -f /keel/test.sh ]; then
    sh /keel/test.sh
    echo "KEEL_SCRIPT_EXIT=$?"
fi
# Command loop for Guest::exec: a line "<tag> <n>", then n lines of base64
# holding the script; it runs in its own shell and "<tag>=<status>" follows
# its output. Base64 keeps quoting and the tty's line length out of the way.
echo KEEL_SHELL_READY
while read -r tag n; do
    : > /tmp/keel-cmd.b64
    i=0
    while [ "$i" -lt "$n" ]; do read -r l; echo "$l" >> /tmp/keel-cmd.b64; i=$((i + 1)); done
    base64 -d /tmp/keel-cmd.b64 > /tmp/keel-cmd
    sh /tmp/keel-cmd < /dev/null 2>&1
    printf '%s=%d\n' "$tag" $?
done
"#;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// KVM if a probe boot under KVM works on this machine (probed once per
    /// machine boot, cached under `target/`), else TCG. `KEEL_GUEST_ACCEL=tcg|kvm`
    /// overrides.
    pub fn detect() -> Result<Accel> {
        static DETECTED: OnceLock<Accel> = OnceLock::new();
        if let Some(accel) = DETECTED.get() {
            return Ok(*accel);
        }
        let accel = match std::env::var("KEEL_GUEST_ACCEL").as_deref() {
            Ok("tcg") => Accel::Tcg,
            Ok("kvm") => Accel::Kvm,
            _ => probe_kvm_cached()?,
        };
        Ok(*DETECTED.get_or_init(|| accel))
    }

    fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// The cached kernel + initramfs pair.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_version: String,
}

impl GuestImage {
    /// Builds the image if it is not cached yet; safe to call from many test
    /// processes at once (a file lock serializes the build).
    pub fn get() -> Result<GuestImage> {
        static IMAGE: OnceLock<GuestImage> = OnceLock::new();
        if let Some(image) = IMAGE.get() {
            return Ok(image.clone());
        }
        let image = build_image_cached()?;
        Ok(IMAGE.get_or_init(|| image).clone())
    }
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// For log file names.
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Shell script `/init` runs after boot (as `sh /keel/test.sh`).
    pub script: Option<String>,
    /// More QEMU arguments: vhost-user devices, chardevs.
    pub qemu_args: Vec<String>,
    pub accel: Option<Accel>,
}

impl GuestConfig {
    pub fn new(name: &str) -> GuestConfig {
        GuestConfig {
            name: name.into(),
            memory_mib: 256,
            vcpus: 1,
            script: None,
            qemu_args: Vec::new(),
            accel: None,
        }
    }

    pub fn script(mut self, script: &str) -> GuestConfig {
        self.script = Some(script.into());
        self
    }

    pub fn qemu_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> GuestConfig {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> GuestConfig {
        self.memory_mib = mib;
        self
    }
}

/// Everything the guest printed, shared with the thread reading it.
#[derive(Default)]
struct Console {
    text: Mutex<ConsoleText>,
    grew: Condvar,
}

#[derive(Default)]
struct ConsoleText {
    bytes: Vec<u8>,
    closed: bool,
}

/// A running QEMU guest; killed (and its per-boot files removed) on drop.
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Console>,
    log_path: PathBuf,
    _run_dir: tempfile_dir::TempDir,
    accel: Accel,
    exec_seq: u32,
    shell_ready: bool,
    /// Console offset up to which output has been consumed by waits.
    cursor: usize,
}

impl Guest {
    /// Boots a guest and waits until `/init` is ready.
    pub fn boot(config: GuestConfig) -> Result<Guest> {
        let accel = match config.accel {
            Some(accel) => accel,
            None => Accel::detect()?,
        };
        let mut guest = Guest::start(&config, accel)?;
        guest.wait_for(READY, BOOT_TIMEOUT)?;
        Ok(guest)
    }

    fn start(config: &GuestConfig, accel: Accel) -> Result<Guest> {
        let image = GuestImage::get()?;
        let runs = target_dir().join("keel-guest").join("runs");
        fs::create_dir_all(&runs).map_err(io_err(format!("create {}", runs.display())))?;
        let run_dir = tempfile_dir::TempDir::new_in(&runs, &config.name)?;
        let initrd = run_dir.path().join("initrd");
        write_initrd_with_script(&image.initramfs, config.script.as_deref(), &initrd)?;
        let log_path = run_dir.log_path();

        let mem = format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            config.memory_mib
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "q35", "-nodefaults", "-no-user-config"])
            .args(accel.qemu_args())
            .args(["-m", &format!("{}M", config.memory_mib)])
            .args(["-smp", &config.vcpus.to_string()])
            .args(["-object", &mem, "-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=1"])
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .args(&config.qemu_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; between fork and exec the child
        // only asks to be killed when this thread (the test) dies, so a
        // crashed test leaves no QEMU behind.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| FixtureError::Spawn {
            cmd: "qemu-system-x86_64".into(),
            source,
        })?;
        let console = Arc::new(Console::default());
        let log =
            File::create(&log_path).map_err(io_err(format!("create {}", log_path.display())))?;
        if let Some(stderr) = child.stderr.take() {
            // QEMU's own complaints go into the same transcript.
            spawn_reader(stderr, log.try_clone().ok(), console.clone(), false);
        }
        if let Some(stdout) = child.stdout.take() {
            spawn_reader(stdout, Some(log), console.clone(), true);
        }
        let stdin = child.stdin.take();
        Ok(Guest {
            child,
            stdin,
            console,
            log_path,
            _run_dir: run_dir,
            accel,
            exec_seq: 0,
            shell_ready: false,
            cursor: 0,
        })
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the serial console is logged (kept after the guest is gone).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything printed so far.
    pub fn console(&self) -> String {
        let text = self.console.text.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&text.bytes).into_owned()
    }

    /// Waits until `marker` appears after what earlier waits consumed;
    /// returns the console text from there up to and including the marker.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let (start, end) = self.wait_match(marker.as_bytes(), timeout)?;
        let text = self.console.text.lock().unwrap_or_else(|e| e.into_inner());
        let out = String::from_utf8_lossy(&text.bytes[start..end]).into_owned();
        self.cursor = end;
        Ok(out)
    }

    fn wait_match(&mut self, marker: &[u8], timeout: Duration) -> Result<(usize, usize)> {
        let deadline = Instant::now() + timeout;
        let mut text = self.console.text.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(pos) = find(&text.bytes[self.cursor..], marker) {
                return Ok((self.cursor, self.cursor + pos + marker.len()));
            }
            let what = String::from_utf8_lossy(marker).into_owned();
            if text.closed {
                return Err(FixtureError::GuestExited {
                    what,
                    tail: tail(&text.bytes),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FixtureError::Timeout {
                    what,
                    after: timeout,
                    tail: tail(&text.bytes),
                });
            }
            text = self
                .console
                .grew
                .wait_timeout(text, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs a shell script in the guest over the serial console, in a shell
    /// of its own (no state carries over between calls; stdin is empty);
    /// returns its exit status and combined stdout/stderr. Waits first for
    /// the test's boot script to finish.
    pub fn exec(&mut self, script: &str, timeout: Duration) -> Result<(i32, String)> {
        let marker = self.start_script(script, timeout)?;
        let before = self.wait_for(&marker, timeout)?;
        let rest = self.wait_for("\n", timeout)?;
        let code = rest
            .trim()
            .parse::<i32>()
            .map_err(|_| FixtureError::Image(format!("bad status line {rest:?}")))?;
        let output = before
            .strip_suffix(&marker)
            .unwrap_or(&before)
            .replace("\r\n", "\n");
        Ok((code, output))
    }

    /// Hands a script to the command loop; returns the marker that will
    /// precede its exit status.
    fn start_script(&mut self, script: &str, timeout: Duration) -> Result<String> {
        if !self.shell_ready {
            self.wait_for(SHELL_READY, timeout)?;
            self.wait_for("\n", timeout)?;
            self.shell_ready = true;
        }
        self.exec_seq += 1;
        let tag = format!("__KEEL_RC_{}", self.exec_seq);
        let encoded = base64::engine::general_purpose::STANDARD.encode(script);
        // Short lines stay far below the tty's 4 KiB canonical line limit.
        let lines: Vec<&str> = encoded
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        let mut message = format!("{tag} {}\n", lines.len());
        for line in lines {
            message.push_str(line);
            message.push('\n');
        }
        self.send(&message)?;
        Ok(format!("{tag}="))
    }

    /// Runs a command that must exit 0; returns its output.
    pub fn run(&mut self, command: &str) -> Result<String> {
        let (code, output) = self.exec(command, BOOT_TIMEOUT)?;
        if code != 0 {
            return Err(FixtureError::Command {
                cmd: format!("(guest) {command}"),
                status: format!("exit {code}"),
                stderr: output,
            });
        }
        Ok(output)
    }

    /// Writes raw text to the serial console.
    pub fn send(&mut self, text: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| FixtureError::Image("console closed".into()))?;
        stdin
            .write_all(text.as_bytes())
            .map_err(io_err("write to guest console"))?;
        stdin.flush().map_err(io_err("write to guest console"))
    }

    /// Powers the guest off from inside and waits for QEMU to exit.
    pub fn poweroff(mut self, timeout: Duration) -> Result<ExitStatus> {
        // Its status line never comes: the guest is gone before.
        self.start_script("sync; poweroff -f", timeout)?;
        self.wait_exit(timeout)
    }

    /// Waits for QEMU to exit on its own (the script powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().map_err(io_err("wait for qemu"))? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(FixtureError::Timeout {
                    what: "qemu to exit".into(),
                    after: timeout,
                    tail: tail(self.console().as_bytes()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // `_run_dir` (the per-boot initrd) is removed when the field drops.
    }
}

/// Copies one of QEMU's outputs into the console buffer and the log; the
/// serial side (`closes_console`) marks the console closed at EOF.
fn spawn_reader(
    mut from: impl Read + Send + 'static,
    mut log: Option<File>,
    console: Arc<Console>,
    closes_console: bool,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(log) = log.as_mut() {
                let _ = log.write_all(&buf[..n]);
            }
            let mut text = console.text.lock().unwrap_or_else(|e| e.into_inner());
            text.bytes.extend_from_slice(&buf[..n]);
            console.grew.notify_all();
        }
        if closes_console {
            let mut text = console.text.lock().unwrap_or_else(|e| e.into_inner());
            text.closed = true;
            console.grew.notify_all();
        }
    });
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(2000);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The cached image plus a second cpio archive holding the script: the
/// kernel unpacks concatenated archives in order.
fn write_initrd_with_script(base: &Path, script: Option<&str>, out: &Path) -> Result<()> {
    let mut bytes = fs::read(base).map_err(io_err(format!("read {}", base.display())))?;
    if let Some(script) = script {
        let mut archive = CpioWriter::default();
        archive.dir("keel")?;
        archive.file("keel/test.sh", 0o755, script.as_bytes())?;
        bytes.extend(archive.finish()?);
    }
    fs::write(out, bytes).map_err(io_err(format!("write {}", out.display())))
}

fn build_image_cached() -> Result<GuestImage> {
    let kernel = Kernel::newest_installed()?;
    let version = kernel.version.clone();
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        return Err(FixtureError::Image(
            "/bin/busybox missing; install busybox-static".into(),
        ));
    }
    let mut key = DefaultHasher::new();
    (INIT, DEFAULT_MODULES, &version).hash(&mut key);
    for path in [&kernel.image, &busybox.to_path_buf()] {
        let meta = fs::metadata(path).map_err(io_err(format!("stat {}", path.display())))?;
        (meta.len(), meta.modified().ok()).hash(&mut key);
    }
    let dir = target_dir().join("keel-guest");
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let initramfs = dir.join(format!("initramfs-{version}-{:016x}.cpio", key.finish()));
    let image = GuestImage {
        kernel: kernel.image.clone(),
        initramfs: initramfs.clone(),
        kernel_version: version.clone(),
    };
    if initramfs.exists() {
        return Ok(image);
    }
    let lock = File::create(dir.join("build.lock")).map_err(io_err("create build lock"))?;
    lock.lock().map_err(io_err("lock guest image build"))?;
    if initramfs.exists() {
        return Ok(image);
    }

    let order = kernel.resolve_modules(DEFAULT_MODULES)?;

    let mut archive = CpioWriter::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "etc",
        "lib",
        "lib/modules",
        "tmp",
        "keel",
    ] {
        archive.dir(d)?;
    }
    archive.char_device("dev/console", 5, 1)?;
    archive.file("init", 0o755, INIT.as_bytes())?;
    archive.file(
        "bin/busybox",
        0o755,
        &fs::read(busybox).map_err(io_err("read /bin/busybox"))?,
    )?;
    let mut list = String::new();
    for module in &order {
        let name = format!("{}.ko", module_name(module));
        let data = kernel.read_module(module)?;
        archive.file(&format!("lib/modules/{name}"), 0o644, &data)?;
        list.push_str(&name);
        list.push('\n');
    }
    archive.file("etc/keel-modules", 0o644, list.as_bytes())?;
    let bytes = archive.finish()?;

    let partial = initramfs.with_extension("partial");
    fs::write(&partial, bytes).map_err(io_err(format!("write {}", partial.display())))?;
    fs::rename(&partial, &initramfs).map_err(io_err("publish guest image"))?;
    Ok(image)
}

fn probe_kvm_cached() -> Result<Accel> {
    if File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(Accel::Tcg);
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let dir = target_dir().join("keel-guest");
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    let cache = dir.join(format!("kvm-probe-{}", boot_id.trim()));
    let lock = File::create(dir.join("probe.lock")).map_err(io_err("create probe lock"))?;
    lock.lock().map_err(io_err("lock kvm probe"))?;
    if let Ok(cached) = fs::read_to_string(&cache) {
        return Ok(if cached.trim() == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        });
    }
    let mut guest = Guest::start(&GuestConfig::new("kvm-probe"), Accel::Kvm)?;
    let accel = match guest.wait_for(READY, KVM_PROBE_TIMEOUT) {
        Ok(_) => Accel::Kvm,
        Err(_) => Accel::Tcg,
    };
    drop(guest);
    let _ = fs::write(&cache, if accel == Accel::Kvm { "kvm" } else { "tcg" });
    Ok(accel)
}

/// Per-boot scratch directory (the initrd with the script), removed on drop;
/// the console log is written beside it so it survives for post-mortems.
mod tempfile_dir {
    use super::*;

    static SEQ: AtomicU32 = AtomicU32::new(0);

    pub struct TempDir {
        path: PathBuf,
        logs: PathBuf,
    }

    impl TempDir {
        pub fn new_in(parent: &Path, label: &str) -> Result<TempDir> {
            let label: String = label
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let unique = format!(
                "{label}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let path = parent.join(&unique);
            fs::create_dir_all(&path).map_err(io_err(format!("create {}", path.display())))?;
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o755));
            let logs = parent.join("logs");
            fs::create_dir_all(&logs).map_err(io_err(format!("create {}", logs.display())))?;
            Ok(TempDir {
                path,
                logs: logs.join(format!("{unique}.log")),
            })
        }

        pub fn path(&self) -> &Path {
            &self.path
        }

        pub fn log_path(&self) -> PathBuf {
            self.logs.clone()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Builds a UEFI-bootable GPT disk image of the guest (Debian kernel +
/// busybox initramfs with `script` run at boot, booted by systemd-boot
/// under OVMF) at `out`, with an empty `data_mib` MiB second partition
/// (`/dev/vda2` in the guest) for tests to write to: the image an operator
/// would upload to keel.
pub fn guest_disk_image(out: &Path, script: &str, data_mib: u32) -> Result<()> {
    guest_disk_image_with(out, script, data_mib, BootLoader::SystemdBoot)
}

/// As [`guest_disk_image`], booted by `loader` (Debian's signed shim and
/// GRUB boot under secure boot).
pub fn guest_disk_image_with(
    out: &Path,
    script: &str,
    data_mib: u32,
    loader: BootLoader,
) -> Result<()> {
    let image = GuestImage::get()?;
    let stage = tempfile_dir::TempDir::new_in(
        &crate::target_dir().join("keel-guest").join("runs"),
        "disk",
    )?;
    let initrd = stage.path().join("initrd");
    write_initrd_with_script(&image.initramfs, Some(script), &initrd)?;
    let mut key = DefaultHasher::new();
    (script, data_mib, &image.kernel_version, loader).hash(&mut key);
    let seed = key.finish().to_le_bytes();
    let mut digest = [0u8; 32];
    for (i, b) in digest.iter_mut().enumerate() {
        *b = seed[i % 8] ^ u8::try_from(i).unwrap_or(0);
    }
    keel_firmware::disk::build(&keel_firmware::disk::DiskConfig {
        out: out.to_owned(),
        loader,
        kernel: image.kernel.clone(),
        initramfs: initrd,
        cmdline: "console=ttyS0 panic=-1 quiet loglevel=1".into(),
        source_date_epoch: 0,
        state_mib: data_mib,
        digest,
    })
    .map_err(|e| FixtureError::Image(format!("guest disk image: {e}")))?;
    Ok(())
}
