//! Ports of local servers: a taken one is refused with its holder named.

use super::LocalError;

/// Refuse, with the port and its holder named, a port another process holds.
pub(crate) fn check_port_free(port: u16, server: &str) -> Result<(), LocalError> {
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
        return Ok(());
    }
    Err(LocalError::PortInUse {
        port,
        server: server.to_string(),
        holder: port_holder(port),
    })
}

/// Who holds a local TCP port, as far as /proc tells: a listening process, or an outgoing
/// connection (the port lies in the kernel's ephemeral range).
fn port_holder(port: u16) -> String {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                // State 0A is LISTEN.
                inodes.push((f.get(3) == Some(&"0A"), f.get(9).unwrap_or(&"").to_string()));
            }
        }
    }
    let Some((listening, inode)) = inodes.into_iter().max_by_key(|(l, _)| *l) else {
        return "unknown".into();
    };
    let target = format!("socket:[{inode}]");
    let owner = std::fs::read_dir("/proc").ok().and_then(|procs| {
        procs.flatten().find_map(|p| {
            let fds = std::fs::read_dir(p.path().join("fd")).ok()?;
            let holds = fds.flatten().any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target)
            });
            holds.then(|| {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                format!("{} (pid {})", comm.trim(), p.file_name().to_string_lossy())
            })
        })
    });
    match (listening, owner) {
        (true, Some(o)) => format!("{o}, listening"),
        (true, None) => "a listening socket of another user".into(),
        (false, Some(o)) => format!("an outgoing connection of {o}"),
        (false, None) => "an outgoing connection (the port is in the ephemeral range)".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_taken_port_is_refused_with_its_holder_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let e = super::check_port_free(port, "g0-a")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&port.to_string()) && e.contains("g0-a"), "{e}");
        assert!(e.contains("listening"), "the holder is named: {e}");
        drop(listener);
        assert!(super::check_port_free(port, "g0-a").is_ok());
    }
}
