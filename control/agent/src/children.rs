//! Children that must not outlive the agent. The data plane and the load
//! balancer proxies hold interfaces, vhost-user sockets and addresses: one
//! left running after `keel up` was killed (SIGKILL, OOM) would collide
//! with the one the next `keel up` starts. (Disk backends are different:
//! VMs keep running on them and a clean stop hands them over.)

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child get SIGTERM when the agent's thread ends (the agent
/// thread lives as long as the process, and dies with it).
pub fn end_with_agent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; between fork and exec the child
    // only sets its parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
